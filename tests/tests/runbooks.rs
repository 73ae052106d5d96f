//! Runbooks (issue 8) are checked against what really exists:
//!
//! * every alert in `deployments/prometheus/rules/*.yml` has a `runbook_url` of the contract form
//!   (`https://github.com/n-kudo/n-kudo/blob/main/runbooks/<file>.md`) whose file exists, the one the on-call
//!   contract names for it, whose Alert section names it with the rule's severity, and which `runbooks/README.md`
//!   lists on the alert's row; every contract alert is defined;
//! * every contract page (one per alert, one per procedure) exists, has the sections Symptoms, Alert, Diagnose,
//!   Fix, Verify and Roll back, and is linked from `runbooks/README.md`;
//! * every relative markdown link in `runbooks/*.md` resolves to a file, and its `#anchor` to a heading of it;
//! * every `releaser`, `nkudo-edge` and `nkudo-control-plane` command shown in a shell code block (```sh, ```bash,
//!   ```console, ```shell or unlabelled; `$ ` prompts; after `sudo`, `env`, `VAR=value`, in pipelines, `$(...)`,
//!   `sh -c '...'`) exists: each subcommand is listed in its parent's `--help` of the real binary
//!   (`target/<profile>/`, see `bin_path`) and each `--flag` appears in that subcommand's `--help`;
//! * every control-plane request shown (a `curl` of `$CP/...` in a shell block, with its method, or an inline
//!   `` `GET /path` `` in the text) is a route of `control-plane/src/routes/mod.rs` that answers that method;
//! * every shell code block parses (`bash -n`) and passes `shellcheck --severity=warning` (SC2034 and SC2164
//!   excluded: a block's variables are used by later blocks, and `cd ... || exit` would close the operator's
//!   interactive shell). A missing shellcheck skips that half loudly, or fails when `CI` is set.
//!
//! The shell-word parser, the help parser and the checker are unit-tested on fixed strings, so a parser that
//! silently finds nothing fails.

use nkudo_tests::bin_path;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use nkudo_tests::oncall::{CONTRACT_ALERTS, CONTRACT_PROCEDURES, RUNBOOK_URL_PREFIX};

/// The sections every page has (level-2 headings, in any order).
const REQUIRED_SECTIONS: &[&str] = &["Symptoms", "Alert", "Diagnose", "Fix", "Verify", "Roll back"];

/// Our binaries: a command whose program (basename) is one of these is checked against its `--help`.
const OUR_BINARIES: &[&str] = &["releaser", "nkudo-edge", "nkudo-control-plane"];

/// Code block languages whose content is shell.
const SHELL_LANGS: &[&str] = &["", "sh", "bash", "shell", "console", "shell-session", "zsh"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn runbooks_dir() -> PathBuf {
    workspace_root().join("runbooks")
}

/// Every `runbooks/*.md`, sorted, with its text.
fn runbook_pages() -> Vec<(PathBuf, String)> {
    let mut pages: Vec<(PathBuf, String)> = std::fs::read_dir(runbooks_dir())
        .expect("read runbooks/")
        .map(|e| e.expect("runbooks/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (p, text)
        })
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "no runbooks/*.md");
    pages
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

// -------------------------------------------------------------------------------------------------------------
// Markdown: fenced code blocks, headings, anchors, links

/// A fenced code block: its language tag (lower case, may be empty), its lines and the 1-based line number of
/// its first content line.
#[derive(Debug, Clone, PartialEq)]
struct CodeBlock {
    lang: String,
    lines: Vec<String>,
    first_line: usize,
}

/// Splits markdown into its fenced code blocks and the lines outside them (`(line number, text)`). Fences may
/// be indented (inside list items); their indentation is removed from the content.
fn split_markdown(text: &str) -> (Vec<CodeBlock>, Vec<(usize, String)>) {
    let mut blocks = Vec::new();
    let mut prose = Vec::new();
    let mut open: Option<(usize, char, usize, CodeBlock)> = None; // indent, fence char, fence length, block
    for (i, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim_start();
        let fence_char = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let fence_len = fence_char
            .map(|c| trimmed.chars().take_while(|x| *x == c).count())
            .unwrap_or(0);
        match open.take() {
            None => {
                if fence_len >= 3 {
                    let c = fence_char.unwrap_or('`');
                    let info = trimmed[fence_len..].trim();
                    let lang = info.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
                    open = Some((
                        indent,
                        c,
                        fence_len,
                        CodeBlock {
                            lang,
                            lines: Vec::new(),
                            first_line: i + 2,
                        },
                    ));
                } else {
                    prose.push((i + 1, line.to_string()));
                }
            }
            Some((ind, c, len, mut block)) => {
                let closes = fence_char == Some(c) && fence_len >= len && trimmed[fence_len..].trim().is_empty();
                if closes {
                    blocks.push(block);
                } else {
                    let strip = indent.min(ind);
                    block.lines.push(line[strip..].to_string());
                    open = Some((ind, c, len, block));
                }
            }
        }
    }
    if let Some((_, _, _, block)) = open {
        blocks.push(block); // an unclosed fence runs to the end (as CommonMark says)
    }
    (blocks, prose)
}

/// GitHub's anchor of a heading: lower case, punctuation removed except `-` and `_`, spaces to `-`.
fn github_slug(heading: &str) -> String {
    let text = strip_inline_markup(heading);
    text.to_lowercase()
        .chars()
        .filter_map(|c| {
            if c == ' ' {
                Some('-')
            } else if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c)
            } else {
                None
            }
        })
        .collect()
}

/// Heading text without markdown: links keep their text, backticks and emphasis markers go.
fn strip_inline_markup(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find('[') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match (after.find("]("), after.find(')')) {
            (Some(close), Some(paren)) if close < paren => {
                out.push_str(&after[..close]);
                rest = &after[paren + 1..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace(['`', '*'], "")
}

/// The anchors of a markdown file's headings (ATX headings outside code blocks), with GitHub's `-1`, `-2`
/// suffixes for repeated ones.
fn heading_anchors(text: &str) -> HashSet<String> {
    let (_, prose) = split_markdown(text);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = HashSet::new();
    for (_, line) in prose {
        let t = line.trim_start();
        let level = t.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&level) || !t[level..].starts_with(' ') {
            continue;
        }
        let title = t[level..].trim().trim_end_matches('#').trim();
        let base = github_slug(title);
        let n = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
        *n += 1;
    }
    anchors
}

/// Level-2 headings of a markdown file (outside code blocks).
fn sections(text: &str) -> Vec<String> {
    let (_, prose) = split_markdown(text);
    prose
        .into_iter()
        .filter_map(|(_, l)| l.strip_prefix("## ").map(|t| t.trim().to_string()))
        .collect()
}

/// The text of a level-2 section (up to the next level-2 heading), empty when there is none.
fn section_text(text: &str, title: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("## ") {
            inside = t.trim() == title;
            continue;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Inline links `[text](target)` of the prose lines (inline code spans skipped): `(line, target)`.
fn markdown_links(text: &str) -> Vec<(usize, String)> {
    let (_, prose) = split_markdown(text);
    let mut links = Vec::new();
    for (n, line) in prose {
        // Drop inline code spans so that `[a](b)` inside backticks is not a link.
        let mut plain = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
                plain.push(' ');
            } else if in_code {
                plain.push(' ');
            } else {
                plain.push(c);
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let target = after[..end].split_whitespace().next().unwrap_or("").to_string();
            links.push((n, target));
            rest = &after[end..];
        }
    }
    links
}

// -------------------------------------------------------------------------------------------------------------
// Shell: words, commands

/// A shell token: a word (quotes removed, variables left as written) or an operator.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    /// Ends a simple command: `|`, `||`, `&&`, `;`, `&`, `(`, `)`, `$(`, a backtick, a newline.
    Sep,
    /// A redirection operator (`>`, `>>`, `<`, `2>`, `2>&1`, `&>`, `<<<`); the next word is its target.
    Redir,
}

/// Tokenizes shell text (one script; comments dropped). Good enough for documentation: quotes, escapes,
/// `$(...)`, pipelines, lists, redirections. `$(` inside double quotes is kept in the word.
fn shell_tokens(script: &str) -> Vec<Tok> {
    let mut toks = Vec::new();
    let mut word = String::new();
    let mut in_word = false; // a word has started (possibly empty quotes)
    let mut quoted = false; // the current word has a quoted part
    let chars: Vec<char> = script.chars().collect();
    let mut i = 0;
    let flush = |toks: &mut Vec<Tok>, word: &mut String, in_word: &mut bool, quoted: &mut bool| {
        if *in_word {
            toks.push(Tok::Word(std::mem::take(word)));
        }
        *in_word = false;
        *quoted = false;
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => flush(&mut toks, &mut word, &mut in_word, &mut quoted),
            '\n' | ';' | '|' | '(' | ')' | '`' => {
                flush(&mut toks, &mut word, &mut in_word, &mut quoted);
                toks.push(Tok::Sep);
                if (c == '|' || c == ';') && chars.get(i + 1) == Some(&c) {
                    i += 1;
                }
            }
            '&' => {
                if chars.get(i + 1) == Some(&'>') {
                    flush(&mut toks, &mut word, &mut in_word, &mut quoted);
                    toks.push(Tok::Redir);
                    i += 1;
                    while chars.get(i + 1) == Some(&'>') {
                        i += 1;
                    }
                } else {
                    flush(&mut toks, &mut word, &mut in_word, &mut quoted);
                    toks.push(Tok::Sep);
                    if chars.get(i + 1) == Some(&'&') {
                        i += 1;
                    }
                }
            }
            '>' | '<' => {
                // `2>`: a word of digits right before the operator is a file descriptor, not a word.
                if in_word && !quoted && !word.is_empty() && word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                }
                flush(&mut toks, &mut word, &mut in_word, &mut quoted);
                while matches!(chars.get(i + 1), Some('>') | Some('<') | Some('&')) {
                    i += 1;
                }
                // `>&1`, `2>&1`: the descriptor digits that follow belong to the operator.
                if chars[i] == '&' {
                    while chars.get(i + 1).is_some_and(|d| d.is_ascii_digit() || *d == '-') {
                        i += 1;
                    }
                    toks.push(Tok::Redir);
                    toks.push(Tok::Word(String::new()));
                } else {
                    toks.push(Tok::Redir);
                }
            }
            '#' if !in_word => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.get(i + 1) {
                    if *n != '\n' {
                        word.push(*n);
                    } else {
                        in_word = !word.is_empty();
                    }
                    i += 1;
                }
            }
            '\'' => {
                in_word = true;
                quoted = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
            }
            '"' => {
                in_word = true;
                quoted = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) {
                        i += 1;
                    }
                    word.push(chars[i]);
                    i += 1;
                }
            }
            '$' if chars.get(i + 1) == Some(&'(') && chars.get(i + 2) != Some(&'(') => {
                flush(&mut toks, &mut word, &mut in_word, &mut quoted);
                toks.push(Tok::Sep);
                i += 1;
            }
            _ => {
                in_word = true;
                word.push(c);
            }
        }
        i += 1;
    }
    flush(&mut toks, &mut word, &mut in_word, &mut quoted);
    toks
}

/// One of our binaries as a runbook invokes it: the binary's name and its arguments.
#[derive(Debug, Clone, PartialEq)]
struct Invocation {
    bin: String,
    args: Vec<String>,
}

fn is_assignment(w: &str) -> bool {
    match w.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    }
}

fn basename(w: &str) -> &str {
    w.rsplit('/').next().unwrap_or(w)
}

/// The invocations of our binaries in a shell script (see [`simple_commands`]).
fn invocations(script: &str) -> Vec<Invocation> {
    simple_commands(script)
        .into_iter()
        .filter(|c| OUR_BINARIES.contains(&c.bin.as_str()))
        .collect()
}

/// Every simple command of a shell script as program (basename) and arguments. The program is found after
/// assignments, `sudo`/`env` and their options, and wrappers (`time`, `exec`, `nohup`, `command`, `nice`,
/// `timeout`, `watch`, shell keywords); the scripts of `sh -c '...'` / `bash -c '...'` are split too.
fn simple_commands(script: &str) -> Vec<Invocation> {
    let toks = shell_tokens(script);
    // Words of each simple command, redirection targets removed.
    let mut commands: Vec<Vec<String>> = vec![Vec::new()];
    let mut skip_next = false;
    for t in toks {
        match t {
            Tok::Sep => commands.push(Vec::new()),
            Tok::Redir => skip_next = true,
            Tok::Word(w) => {
                if std::mem::take(&mut skip_next) {
                    continue;
                }
                commands.last_mut().expect("one command at least").push(w);
            }
        }
    }
    let mut found = Vec::new();
    for words in commands {
        let mut i = 0;
        while let Some(w) = words.get(i) {
            let w = w.as_str();
            if is_assignment(w) {
                i += 1;
            } else if w == "sudo" {
                i += 1;
                while let Some(o) = words.get(i).filter(|o| o.starts_with('-')) {
                    let takes = matches!(
                        o.as_str(),
                        "-u" | "-g" | "-C" | "-D" | "-h" | "-p" | "-r" | "-t" | "-U" | "-T"
                    );
                    i += if takes { 2 } else { 1 };
                }
            } else if w == "env" {
                i += 1;
                while let Some(o) = words.get(i).filter(|o| o.starts_with('-')) {
                    i += if matches!(o.as_str(), "-u" | "-C" | "-S") { 2 } else { 1 };
                }
            } else if matches!(
                w,
                "time"
                    | "exec"
                    | "nohup"
                    | "command"
                    | "!"
                    | "do"
                    | "then"
                    | "else"
                    | "elif"
                    | "if"
                    | "while"
                    | "until"
            ) {
                i += 1;
            } else if matches!(w, "nice" | "watch" | "timeout") {
                i += 1;
                while let Some(o) = words.get(i).filter(|o| o.starts_with('-')) {
                    i += if matches!(o.as_str(), "-n" | "-s" | "-k") { 2 } else { 1 };
                }
                if w == "timeout" {
                    i += 1; // the duration
                }
            } else if matches!(w, "sh" | "bash") {
                if let Some(pos) = words[i + 1..].iter().position(|a| a == "-c") {
                    if let Some(inner) = words.get(i + 1 + pos + 1) {
                        found.extend(simple_commands(inner));
                    }
                }
                break;
            } else {
                found.push(Invocation {
                    bin: basename(w).to_string(),
                    args: words[i + 1..].to_vec(),
                });
                break;
            }
        }
    }
    found
}

/// The shell script of a code block whose commands are looked for: [`block_shell`] without here-document bodies.
fn block_script(block: &CodeBlock) -> String {
    block_shell(block, true)
}

/// The shell text of a code block: `$ ` prompt lines when the block has any (the other lines are output), else
/// every line; here-document bodies dropped when `drop_heredocs`.
fn block_shell(block: &CodeBlock, drop_heredocs: bool) -> String {
    let prompted = block.lines.iter().any(|l| l.trim_start().starts_with("$ "));
    let mut out = String::new();
    let mut heredoc_end: Option<String> = None;
    let mut continued = false;
    for line in &block.lines {
        if let Some(end) = &heredoc_end {
            if line.trim() == end {
                heredoc_end = None;
            }
            if !drop_heredocs {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        let l = line.trim_start();
        let content = if prompted && !continued {
            match l.strip_prefix("$ ") {
                Some(c) => c,
                None => continue,
            }
        } else {
            line.as_str()
        };
        continued = content.trim_end().ends_with('\\');
        if let Some(pos) = content.find("<<") {
            let tag: String = content[pos + 2..]
                .trim_start_matches(['-', '~'])
                .trim_start()
                .trim_matches(|c| c == '\'' || c == '"')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !tag.is_empty() && !content[pos..].starts_with("<<<") {
                heredoc_end = Some(tag);
            }
        }
        out.push_str(content);
        out.push('\n');
    }
    out
}

// -------------------------------------------------------------------------------------------------------------
// --help: subcommands, flags, checking an invocation

/// A flag of a `--help` text: whether it takes a value in the next word (`--url <URL>`; not `--x[=<BOOL>]`).
#[derive(Debug, Clone, PartialEq)]
struct Flag {
    takes_value: bool,
}

/// What a `--help` text says.
#[derive(Debug, Clone, Default, PartialEq)]
struct Help {
    /// `Commands:` entries (without `help`).
    commands: Vec<String>,
    /// Long flags by name (without `--`), short flags as `-x`.
    flags: BTreeMap<String, Flag>,
    /// The usage line requires a subcommand (`<COMMAND>`, not `[COMMAND]`).
    requires_command: bool,
    /// "With --<trigger> ...: ... (see `<bin> <target> --help`)": this subcommand runs `target` when `trigger`
    /// is given.
    alias: Option<(String, String)>,
}

fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    #[derive(PartialEq)]
    enum Section {
        Other,
        Commands,
        Options,
    }
    let mut section = Section::Other;
    for line in text.lines() {
        let t = line.trim();
        if !line.starts_with(' ') && !t.is_empty() {
            section = if t == "Commands:" || t == "Subcommands:" {
                Section::Commands
            } else if t == "Options:" || t.ends_with(" Options:") {
                Section::Options
            } else {
                Section::Other
            };
            if t.starts_with("Usage:") {
                help.requires_command = t.contains("<COMMAND>");
            }
            continue;
        }
        match section {
            Section::Commands => {
                // `  name   description`: only lines indented by exactly two spaces name a command.
                if line.starts_with("  ") && !line.starts_with("   ") {
                    if let Some(name) = t.split_whitespace().next() {
                        if name != "help" {
                            help.commands.push(name.to_string());
                        }
                    }
                }
            }
            Section::Options => {
                if !t.starts_with('-') {
                    continue;
                }
                let words: Vec<&str> = t.split_whitespace().collect();
                let mut last_long: Option<String> = None;
                for (k, w) in words.iter().enumerate() {
                    let w = w.trim_end_matches(',');
                    if let Some(long) = w.strip_prefix("--") {
                        let name: String = long
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                            .collect();
                        if name.is_empty() {
                            break;
                        }
                        let optional_value = long[name.len()..].starts_with("[=");
                        let value_next = words.get(k + 1).is_some_and(|n| n.starts_with('<'));
                        help.flags.insert(
                            name.clone(),
                            Flag {
                                takes_value: value_next && !optional_value,
                            },
                        );
                        last_long = Some(name);
                    } else if w.len() == 2 && w.starts_with('-') && w.as_bytes()[1].is_ascii_alphanumeric() {
                        help.flags.insert(
                            w.to_string(),
                            Flag {
                                takes_value: words.get(k + 1).is_some_and(|n| n.starts_with('<')),
                            },
                        );
                    } else {
                        break;
                    }
                }
                // A short flag shares the value of its long form (`-o, --output <OUTPUT>`).
                if let Some(long) = last_long {
                    let takes = help.flags[&long].takes_value;
                    for w in &words {
                        let w = w.trim_end_matches(',');
                        if w.len() == 2 && w.starts_with('-') && w != "--" {
                            if let Some(f) = help.flags.get_mut(w) {
                                f.takes_value = takes;
                            }
                        }
                    }
                }
            }
            Section::Other => {}
        }
    }
    // "With --to <version>: the fleet rollback (see `releaser fleet-rollback --help`)".
    if let Some(w) = text.find("With --") {
        let trigger: String = text[w + 7..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let target = text[w..]
            .find("(see `")
            .and_then(|s| text[w + s + 6..].split_whitespace().nth(1))
            .map(str::to_string);
        if let (false, Some(target)) = (trigger.is_empty(), target) {
            help.alias = Some((trigger, target));
        }
    }
    help
}

/// Checks one invocation against the help texts `help_of(bin, path)` gives. Returns the problems (empty: fine).
fn check_invocation(inv: &Invocation, help_of: &mut dyn FnMut(&str, &[String]) -> Help) -> Vec<String> {
    let mut problems = Vec::new();
    let mut path: Vec<String> = Vec::new();
    let mut help = help_of(&inv.bin, &path);
    let mut chose_command = false;
    let mut asked_help = false;
    let apply_alias =
        |path: &mut Vec<String>, help: &mut Help, rest: &[String], help_of: &mut dyn FnMut(&str, &[String]) -> Help| {
            if let Some((trigger, target)) = help.alias.clone() {
                let flag = format!("--{trigger}");
                let prefix = format!("--{trigger}=");
                if rest.iter().any(|a| *a == flag || a.starts_with(&prefix)) {
                    if let Some(last) = path.last_mut() {
                        *last = target;
                    }
                    *help = help_of(&inv.bin, path);
                }
            }
        };
    let mut i = 0;
    while i < inv.args.len() {
        let a = &inv.args[i];
        let here = || format!("{} {}", inv.bin, path.join(" ")).trim_end().to_string();
        if a == "--" {
            break;
        }
        if a == "--help" || a == "-h" || a == "--version" || a == "-V" {
            asked_help = true;
            i += 1;
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or("");
            match help.flags.get(name) {
                Some(f) => {
                    if f.takes_value && !long.contains('=') {
                        i += 1;
                    }
                }
                None => problems.push(format!("`{}`: no flag --{name} in `{} --help`", inv_text(inv), here())),
            }
        } else if a.starts_with('-') && a.len() > 1 {
            match help.flags.get(a.as_str()) {
                Some(f) => {
                    if f.takes_value {
                        i += 1;
                    }
                }
                None => problems.push(format!("`{}`: no flag {a} in `{} --help`", inv_text(inv), here())),
            }
        } else if !help.commands.is_empty() && !chose_command {
            if help.commands.iter().any(|c| c == a) {
                path.push(a.clone());
                help = help_of(&inv.bin, &path);
                apply_alias(&mut path, &mut help, &inv.args[i + 1..], help_of);
                chose_command = help.commands.is_empty();
            } else {
                problems.push(format!(
                    "`{}`: `{a}` is not a subcommand of `{}` (its --help lists: {})",
                    inv_text(inv),
                    here(),
                    help.commands.join(", ")
                ));
                return problems;
            }
        }
        // Anything else is a positional argument of the chosen subcommand.
        i += 1;
    }
    if help.requires_command && !chose_command && !asked_help && problems.is_empty() {
        problems.push(format!(
            "`{}`: `{} {}` needs a subcommand",
            inv_text(inv),
            inv.bin,
            path.join(" ")
        ));
    }
    problems
}

fn inv_text(inv: &Invocation) -> String {
    std::iter::once(inv.bin.as_str())
        .chain(inv.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the real binaries' `--help`, once per subcommand path.
#[derive(Default)]
struct RealHelp {
    cache: HashMap<(String, Vec<String>), Help>,
    runs: usize,
}

impl RealHelp {
    fn get(&mut self, bin: &str, path: &[String]) -> Help {
        let key = (bin.to_string(), path.to_vec());
        if let Some(h) = self.cache.get(&key) {
            return h.clone();
        }
        let exe = bin_path(bin);
        let out = Command::new(&exe)
            .args(path)
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("run {} {} --help: {e}", exe.display(), path.join(" ")));
        assert!(
            out.status.success(),
            "{} {} --help failed: {}{}",
            exe.display(),
            path.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.runs += 1;
        let help = parse_help(&String::from_utf8_lossy(&out.stdout));
        self.cache.insert(key, help.clone());
        help
    }
}

// -------------------------------------------------------------------------------------------------------------
// Control-plane routes

/// A route of the control plane: its path template and the methods it answers.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    path: String,
    methods: Vec<String>,
}

/// The routes of `control-plane/src/routes/mod.rs`: each `.route("<path>", get(..).post(..))` call.
fn control_plane_routes() -> Vec<Route> {
    let src = std::fs::read_to_string(workspace_root().join("control-plane/src/routes/mod.rs"))
        .expect("read control-plane/src/routes/mod.rs");
    parse_routes(&src)
}

fn parse_routes(src: &str) -> Vec<Route> {
    let starts: Vec<usize> = src.match_indices(".route(").map(|(i, _)| i).collect();
    let mut routes = Vec::new();
    for (k, &start) in starts.iter().enumerate() {
        // The call's text: up to the next `.route(` or the router's next method.
        let end = starts
            .get(k + 1)
            .copied()
            .or_else(|| src[start..].find(".fallback(").map(|e| start + e))
            .unwrap_or(src.len());
        let call = &src[start + ".route(".len()..end];
        let Some(lit) = call.trim_start().strip_prefix('"') else {
            continue;
        };
        let Some(close) = lit.find('"') else { continue };
        let path = &lit[..close];
        if !path.starts_with('/') {
            continue;
        }
        let rest = &lit[close..];
        let methods = ["get", "post", "put", "delete", "patch"]
            .into_iter()
            .filter(|m| {
                rest.match_indices(&format!("{m}("))
                    .any(|(i, _)| i == 0 || !rest[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
            })
            .map(str::to_uppercase)
            .collect();
        routes.push(Route {
            path: path.to_string(),
            methods,
        });
    }
    routes
}

/// Does a runbook path (`/admin/agents/$AGENT_ID/labels`) match a route template (`/admin/agents/{agent_id}/labels`)?
/// A `{param}` matches any segment; a literal only itself; a runbook variable (`$X`) only a `{param}`.
fn route_matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.trim_end_matches('/').split('/').collect();
    let p: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                t == p
            }
        })
}

/// The control-plane requests of a script's `curl` commands: (method, path) for every `$CP/...` / `${CP}/...`
/// argument (query and fragment cut off). The method is `-X`/`--request`, else POST when data is sent, else GET.
fn cp_requests(script: &str) -> Vec<(String, String)> {
    let mut requests = Vec::new();
    for cmd in simple_commands(script).into_iter().filter(|c| c.bin == "curl") {
        let mut method = None;
        let mut sends_data = false;
        for (i, a) in cmd.args.iter().enumerate() {
            if a == "-X" || a == "--request" {
                method = cmd.args.get(i + 1).cloned();
            } else if let Some(m) = a
                .strip_prefix("--request=")
                .or_else(|| a.strip_prefix("-X").filter(|m| !m.is_empty()))
            {
                method = Some(m.to_string());
            } else if a == "-d" || a.starts_with("--data") || a == "--json" || a == "-F" || a == "--form" {
                sends_data = true;
            }
        }
        let method = method.unwrap_or_else(|| if sends_data { "POST" } else { "GET" }.to_string());
        for w in &cmd.args {
            for marker in ["${CP}", "$CP"] {
                if let Some(i) = w.find(marker) {
                    let rest = &w[i + marker.len()..];
                    if rest.starts_with('/') {
                        let end = rest.find(['?', '#']).unwrap_or(rest.len());
                        requests.push((method.to_uppercase(), rest[..end].to_string()));
                    }
                    break;
                }
            }
        }
    }
    requests
}

/// Requests named in prose as inline code: `` `GET /admin/agents?version=...` `` → (method, path).
fn prose_requests(text: &str) -> Vec<(usize, String, String)> {
    let (_, prose) = split_markdown(text);
    let mut found = Vec::new();
    for (n, line) in prose {
        for (k, span) in line.split('`').enumerate() {
            if k % 2 == 0 {
                continue; // outside backticks
            }
            let mut parts = span.splitn(2, ' ');
            let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
                continue;
            };
            if ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&method) && target.starts_with('/') {
                let end = target.find(['?', '#', ' ']).unwrap_or(target.len());
                found.push((n, method.to_string(), target[..end].to_string()));
            }
        }
    }
    found
}

/// Why a request is not a route of the control plane, if it is not.
fn route_problem(routes: &[Route], method: &str, path: &str) -> Option<String> {
    let matching: Vec<&Route> = routes.iter().filter(|r| route_matches(&r.path, path)).collect();
    if matching.is_empty() {
        return Some(format!("{method} {path}: no such control-plane route"));
    }
    if !matching.iter().any(|r| r.methods.iter().any(|m| m == method)) {
        let allowed: Vec<String> = matching.iter().flat_map(|r| r.methods.clone()).collect();
        return Some(format!(
            "{method} {path}: the route answers {} only",
            allowed.join(", ")
        ));
    }
    None
}

// =============================================================================================================
// Tests

#[test]
fn every_alert_links_its_contract_runbook() {
    let rules_dir = workspace_root().join("deployments/prometheus/rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&rules_dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", rules_dir.display()))
        .map(|e| e.expect("rules entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    let contract: HashMap<&str, &str> = CONTRACT_ALERTS.iter().copied().collect();
    let index = std::fs::read_to_string(runbooks_dir().join("README.md")).expect("runbooks/README.md exists");
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
        let groups = doc
            .get("groups")
            .and_then(|g| g.as_sequence())
            .cloned()
            .unwrap_or_default();
        for group in groups {
            for rule in group
                .get("rules")
                .and_then(|r| r.as_sequence())
                .cloned()
                .unwrap_or_default()
            {
                let Some(alert) = rule.get("alert").and_then(|a| a.as_str()) else {
                    continue;
                };
                let url = rule
                    .get("annotations")
                    .and_then(|a| a.get("runbook_url"))
                    .and_then(|u| u.as_str())
                    .unwrap_or("");
                let page = match url.strip_prefix(RUNBOOK_URL_PREFIX) {
                    Some(p) if p.ends_with(".md") && !p.contains('/') && !p.contains('#') => p,
                    _ => {
                        problems.push(format!(
                            "{}: alert {alert}: runbook_url {url:?} is not {RUNBOOK_URL_PREFIX}<file>.md",
                            file_name(file)
                        ));
                        continue;
                    }
                };
                match std::fs::read_to_string(runbooks_dir().join(page)) {
                    Err(_) => problems.push(format!(
                        "alert {alert}: runbook_url names runbooks/{page}, which does not exist"
                    )),
                    Ok(text) => {
                        // The page's Alert section names the alert and its severity as the rule sets it.
                        let severity = rule
                            .get("labels")
                            .and_then(|l| l.get("severity"))
                            .and_then(|v| v.as_str())
                            .unwrap_or("");
                        let section = section_text(&text, "Alert");
                        if !section.contains(&format!("`{alert}`")) {
                            problems.push(format!("runbooks/{page}: its Alert section does not name `{alert}`"));
                        }
                        if severity.is_empty() || !section.contains(severity) {
                            problems.push(format!(
                                "runbooks/{page}: its Alert section does not give {alert}'s severity {severity:?}"
                            ));
                        }
                    }
                }
                if let Some(want) = contract.get(alert) {
                    if *want != page {
                        problems.push(format!("alert {alert}: links {page}, the contract says {want}"));
                    }
                }
                // The index lists the alert on a row that links its page.
                if !index
                    .lines()
                    .any(|l| l.contains(&format!("`{alert}`")) && l.contains(&format!("({page})")))
                {
                    problems.push(format!("runbooks/README.md has no row for `{alert}` linking {page}"));
                }
                println!("alert {alert:<36} -> runbooks/{page}");
                seen.push(alert.to_string());
            }
        }
    }
    for (alert, _) in CONTRACT_ALERTS {
        if !seen.iter().any(|s| s == alert) {
            problems.push(format!(
                "contract alert {alert} is not defined in deployments/prometheus/rules/"
            ));
        }
    }
    println!("{} alerts in {} rule files checked", seen.len(), files.len());
    assert!(!seen.is_empty(), "no alerts found in {}", rules_dir.display());
    assert!(
        problems.is_empty(),
        "runbook links of alerts:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn contract_pages_exist_have_the_sections_and_are_indexed() {
    let readme = std::fs::read_to_string(runbooks_dir().join("README.md")).expect("runbooks/README.md exists");
    let indexed: HashSet<String> = markdown_links(&readme).into_iter().map(|(_, t)| t).collect();
    let pages: Vec<&str> = CONTRACT_ALERTS
        .iter()
        .map(|(_, f)| *f)
        .chain(CONTRACT_PROCEDURES.iter().copied())
        .collect();
    let mut problems = Vec::new();
    for page in &pages {
        let path = runbooks_dir().join(page);
        let Ok(text) = std::fs::read_to_string(&path) else {
            problems.push(format!("runbooks/{page} does not exist"));
            continue;
        };
        let have = sections(&text);
        for s in REQUIRED_SECTIONS {
            if !have.iter().any(|h| h == s) {
                problems.push(format!(
                    "runbooks/{page}: no `## {s}` section (has: {})",
                    have.join(", ")
                ));
            }
        }
        if !text.starts_with("# ") {
            problems.push(format!("runbooks/{page}: does not start with a `# ` title"));
        }
        if !indexed.contains(*page) {
            problems.push(format!("runbooks/README.md does not link {page}"));
        }
    }
    // Every page in runbooks/ is in the index too (no orphan pages).
    for (path, _) in runbook_pages() {
        let name = file_name(&path);
        if name != "README.md" && !indexed.contains(&name) {
            problems.push(format!("runbooks/README.md does not link {name}"));
        }
    }
    println!("{} contract pages checked", pages.len());
    assert!(problems.is_empty(), "runbook pages:\n  {}", problems.join("\n  "));
}

#[test]
fn relative_links_resolve() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (path, text) in runbook_pages() {
        for (line, target) in markdown_links(&text) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                path.clone()
            } else {
                path.parent().expect("page has a directory").join(file)
            };
            let at = format!("{}:{line}", file_name(&path));
            if !resolved.exists() {
                problems.push(format!("{at}: link {target:?}: {} does not exist", resolved.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                if resolved.extension().is_some_and(|x| x == "md") {
                    let target_text = std::fs::read_to_string(&resolved).unwrap_or_default();
                    if !heading_anchors(&target_text).contains(anchor) {
                        problems.push(format!("{at}: link {target:?}: no heading with anchor #{anchor}"));
                    }
                }
            }
        }
    }
    println!("{checked} relative links checked");
    assert!(checked > 0, "no relative links found: the link parser is broken");
    assert!(problems.is_empty(), "broken links:\n  {}", problems.join("\n  "));
}

#[test]
fn every_command_shown_exists_in_the_binaries_help() {
    let mut help = RealHelp::default();
    let mut problems = Vec::new();
    let mut per_bin: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_page: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    for (path, text) in runbook_pages() {
        let (blocks, _) = split_markdown(&text);
        for block in blocks.iter().filter(|b| SHELL_LANGS.contains(&b.lang.as_str())) {
            for inv in invocations(&block_script(block)) {
                let found = check_invocation(&inv, &mut |bin, path| help.get(bin, path));
                let where_ = format!("{} (block at line {})", file_name(&path), block.first_line);
                println!(
                    "{}: {}{}",
                    where_,
                    inv_text(&inv),
                    if found.is_empty() { "" } else { "  <- FAILS" }
                );
                problems.extend(found.into_iter().map(|p| format!("{where_}: {p}")));
                *per_bin.entry(inv.bin.clone()).or_default() += 1;
                *per_page.entry(file_name(&path)).or_default() += 1;
                total += 1;
            }
        }
    }
    for (page, n) in &per_page {
        println!("  {page}: {n} commands");
    }
    println!(
        "checked {total} commands ({}) against {} --help outputs",
        per_bin
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        help.runs
    );
    for bin in OUR_BINARIES {
        assert!(
            per_bin.get(*bin).copied().unwrap_or(0) > 0,
            "no `{bin}` command found in any runbook: the parser is broken or the runbooks lost their commands"
        );
    }
    assert!(
        problems.is_empty(),
        "commands that do not exist:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_control_plane_request_shown_is_a_route() {
    let routes = control_plane_routes();
    assert!(
        routes.len() > 30,
        "only {} routes parsed from routes/mod.rs",
        routes.len()
    );
    assert!(
        routes.iter().all(|r| !r.methods.is_empty()),
        "routes without a method: the route parser is broken: {routes:?}"
    );
    let mut problems = Vec::new();
    let (mut curls, mut mentions) = (0, 0);
    for (path, text) in runbook_pages() {
        let (blocks, _) = split_markdown(&text);
        for block in blocks.iter().filter(|b| SHELL_LANGS.contains(&b.lang.as_str())) {
            for (method, p) in cp_requests(&block_script(block)) {
                curls += 1;
                if let Some(why) = route_problem(&routes, &method, &p) {
                    problems.push(format!(
                        "{} (block at line {}): {why}",
                        file_name(&path),
                        block.first_line
                    ));
                }
            }
        }
        for (line, method, p) in prose_requests(&text) {
            mentions += 1;
            if let Some(why) = route_problem(&routes, &method, &p) {
                problems.push(format!("{}:{line}: {why}", file_name(&path)));
            }
        }
    }
    println!(
        "{curls} curl requests and {mentions} route mentions checked against {} routes",
        routes.len()
    );
    assert!(curls > 0 && mentions > 0, "no requests found: the extraction is broken");
    assert!(problems.is_empty(), "unknown routes:\n  {}", problems.join("\n  "));
}

#[test]
fn shell_blocks_parse_and_pass_shellcheck() {
    let shellcheck = tool_or_skip("shellcheck");
    let mut problems = Vec::new();
    let mut blocks_checked = 0;
    for (path, text) in runbook_pages() {
        let (blocks, _) = split_markdown(&text);
        for block in blocks.iter().filter(|b| SHELL_LANGS.contains(&b.lang.as_str())) {
            let script = block_shell(block, false);
            let where_ = format!("{} (block at line {})", file_name(&path), block.first_line);
            let out = run_with_stdin(Command::new("bash").arg("-n"), &script);
            if !out.status.success() {
                problems.push(format!(
                    "{where_}: bash -n: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            if let Some(sc) = &shellcheck {
                let out = run_with_stdin(
                    Command::new(sc).args(["-s", "bash", "--severity=warning", "-e", "SC2034,SC2164", "-"]),
                    &script,
                );
                if !out.status.success() {
                    problems.push(format!(
                        "{where_}: shellcheck:\n{}",
                        String::from_utf8_lossy(&out.stdout).trim()
                    ));
                }
            }
            blocks_checked += 1;
        }
    }
    println!(
        "{blocks_checked} shell blocks checked with bash -n{}",
        if shellcheck.is_some() { " and shellcheck" } else { "" }
    );
    assert!(blocks_checked > 0, "no shell code blocks found");
    assert!(problems.is_empty(), "shell blocks:\n  {}", problems.join("\n  "));
}

/// An external tool on `PATH`: `Some(path)`; missing: a loud SKIPPED line and `None`, or a failure under `CI`.
fn tool_or_skip(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "{name} is not installed and CI is set: install it (Debian: apt-get install {name})"
        );
        println!("SKIPPED: {name} missing (set CI=true to make this a failure)");
    }
    found
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("write to {cmd:?}: {e}"));
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
}

// -------------------------------------------------------------------------------------------------------------
// The parsers themselves

fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn parser_finds_our_commands_in_shell_text() {
    let inv = |bin: &str, args: &[&str]| Invocation {
        bin: bin.into(),
        args: words(args),
    };
    assert_eq!(
        invocations(r#"sudo FOO=bar releaser rollout status --url "$CP" | jq .state"#),
        vec![inv("releaser", &["rollout", "status", "--url", "$CP"])]
    );
    assert_eq!(
        invocations("nkudo-edge version                # what it runs\n"),
        vec![inv("nkudo-edge", &["version"])]
    );
    assert_eq!(
        invocations("X=$(releaser git-version) && nkudo-control-plane audit verify; echo releaser"),
        vec![
            inv("releaser", &["git-version"]),
            inv("nkudo-control-plane", &["audit", "verify"])
        ]
    );
    assert_eq!(
        invocations(r#"/opt/nkudo/releases/"$V"/bin/nkudo-edge verify-heartbeat 2>&1 >/tmp/out"#),
        vec![inv("nkudo-edge", &["verify-heartbeat"])]
    );
    assert_eq!(
        invocations("releaser rollback --to \"$GOOD\" \\\n  --fleet --url \"$CP\"\n"),
        vec![inv(
            "releaser",
            &["rollback", "--to", "$GOOD", "--fleet", "--url", "$CP"]
        )]
    );
    assert_eq!(
        invocations(
            "sudo -u nkudo env -i DATABASE_URL=x sh -c 'nkudo-control-plane migrate && releaser list --root /x'"
        ),
        vec![
            inv("nkudo-control-plane", &["migrate"]),
            inv("releaser", &["list", "--root", "/x"])
        ]
    );
    // Quoted text and arguments are not commands; other programs are not ours.
    assert!(invocations(r#"curl -sS "$CP/healthz" | jq '.x | releaser' ; echo "nkudo-edge run""#).is_empty());
    // A console block: only `$ ` lines are commands.
    let block = CodeBlock {
        lang: "console".into(),
        lines: words(&[
            "$ releaser list --root /opt/nkudo",
            "releaser 1.2.0 (current)",
            "$ nkudo-edge version",
        ]),
        first_line: 1,
    };
    assert_eq!(
        invocations(&block_script(&block)),
        vec![
            inv("releaser", &["list", "--root", "/opt/nkudo"]),
            inv("nkudo-edge", &["version"])
        ]
    );
    // Here-document bodies are not commands.
    let block = CodeBlock {
        lang: "sh".into(),
        lines: words(&[
            "cat > /tmp/p.toml <<'EOF'",
            "releaser nothing",
            "EOF",
            "releaser version",
        ]),
        first_line: 1,
    };
    assert_eq!(invocations(&block_script(&block)), vec![inv("releaser", &["version"])]);
}

#[test]
fn markdown_parser_finds_blocks_links_and_anchors() {
    let md = "# Title\n\nSee [a](other.md#rotating-certificates) and `[b](not-a-link.md)`.\n\n## Roll back\n\n\
              - item:\n  ```sh\n  releaser list\n  ```\n\n```promql\nup\n```\n\n## Roll back\n### `run` (the agent)\n";
    let (blocks, _) = split_markdown(md);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].lang, "sh");
    assert_eq!(blocks[0].lines, vec!["releaser list".to_string()]);
    assert_eq!(blocks[1].lang, "promql");
    assert_eq!(
        markdown_links(md),
        vec![(3, "other.md#rotating-certificates".to_string())]
    );
    let anchors = heading_anchors(md);
    for a in ["title", "roll-back", "roll-back-1", "run-the-agent"] {
        assert!(anchors.contains(a), "{a} missing from {anchors:?}");
    }
    assert_eq!(sections(md), vec!["Roll back".to_string(), "Roll back".to_string()]);
    assert!(section_text(md, "Roll back").contains("releaser list"));
    assert_eq!(section_text(md, "Alert"), "");
    assert_eq!(
        github_slug("Configuration (environment; a duration is `15s`, or bare seconds)"),
        "configuration-environment-a-duration-is-15s-or-bare-seconds"
    );
}

const SAMPLE_PARENT_HELP: &str = "The tool.\n\nUsage: releaser <COMMAND>\n\nCommands:\n  rollout   Rollouts on a control \
plane\n            continued description line\n  rollback  Point <root>/current back at previous (this host). With --to \
<version>: the fleet rollback (see `releaser fleet-rollback --help`)\n  fleet-rollback  Send the fleet back\n  help      \
Print this message\n\nOptions:\n  -h, --help     Print help\n  -V, --version  Print version\n\nExit codes:\n  0  success\n";

const SAMPLE_ROLLBACK_HELP: &str = "Point <root>/current back at previous (this host). With --to <version>: the fleet \
rollback (see `releaser fleet-rollback --help`)\n\nUsage: releaser rollback [OPTIONS]\n\nOptions:\n      --root <ROOT>      \
The layout root [default: /opt/nkudo]\n      --restart          After switching\n  -h, --help             Print help\n";

const SAMPLE_FLEET_HELP: &str = "Send the fleet back\n\nUsage: releaser fleet-rollback [OPTIONS] --to <VERSION>\n\n\
Options:\n      --to <VERSION>           The version\n      --fleet                  Every agent\n      --url <URL>   \
The control plane\n  -h, --help                   Print help\n";

const SAMPLE_STATUS_HELP: &str = "Show a rollout\n\nExit codes:\n  0  success\n\nUsage: releaser rollout status [OPTIONS] \
[ID]\n\nArguments:\n  [ID]\n          The rollout id\n\nOptions:\n  -y, --yes\n          Do not ask\n\n      --insecure[=<BOOL>]\n          \
Dangerous\n          [possible values: true, false]\n\n      --interval <INTERVAL>\n          Time between polls\n\n          \
Possible values:\n          - auto: something\n";

fn sample_help(bin: &str, path: &[String]) -> Help {
    assert_eq!(bin, "releaser");
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    parse_help(match p.as_slice() {
        [] => SAMPLE_PARENT_HELP,
        ["rollback"] => SAMPLE_ROLLBACK_HELP,
        ["fleet-rollback"] => SAMPLE_FLEET_HELP,
        ["rollout"] => "Rollouts\n\nUsage: releaser rollout <COMMAND>\n\nCommands:\n  status  Show\n\nOptions:\n  -h, --help  Print help\n",
        ["rollout", "status"] => SAMPLE_STATUS_HELP,
        other => panic!("no sample help for {other:?}"),
    })
}

#[test]
fn help_parser_and_checker_accept_what_exists_and_refuse_the_rest() {
    let parent = parse_help(SAMPLE_PARENT_HELP);
    assert_eq!(parent.commands, words(&["rollout", "rollback", "fleet-rollback"]));
    assert!(parent.requires_command);
    assert!(parent.flags.contains_key("help") && parent.flags.contains_key("-V"));
    let rollback = parse_help(SAMPLE_ROLLBACK_HELP);
    assert_eq!(rollback.alias, Some(("to".to_string(), "fleet-rollback".to_string())));
    assert_eq!(rollback.flags.get("root"), Some(&Flag { takes_value: true }));
    assert_eq!(rollback.flags.get("restart"), Some(&Flag { takes_value: false }));
    let status = parse_help(SAMPLE_STATUS_HELP);
    assert!(!status.requires_command);
    assert_eq!(status.flags.get("insecure"), Some(&Flag { takes_value: false }));
    assert_eq!(status.flags.get("interval"), Some(&Flag { takes_value: true }));
    assert!(status.flags.contains_key("-y") && status.flags.contains_key("yes"));
    assert!(!status.flags.contains_key("auto"), "a possible value is not a flag");

    let check = |line: &str| {
        let invs = invocations(line);
        assert_eq!(invs.len(), 1, "{line}");
        check_invocation(&invs[0], &mut sample_help)
    };
    // Exists.
    for ok in [
        "releaser rollout status",
        "releaser rollout status \"$ID\" --interval 5s --yes --insecure",
        "releaser rollout status --interval=5s -y --insecure=true",
        "releaser rollback --root /opt/nkudo --restart",
        "releaser rollback --to 1.2.0 --fleet --url \"$CP\"",
        "releaser --version",
        "releaser rollout --help",
    ] {
        assert_eq!(check(ok), Vec::<String>::new(), "{ok}");
    }
    // Does not exist.
    for (bad, why) in [
        ("releaser rollout stats", "is not a subcommand"),
        ("releaser rollout status --watchh", "no flag --watchh"),
        ("releaser rollout status -q", "no flag -q"),
        ("releaser rollback --fleet", "no flag --fleet"),
        ("releaser rollback --to 1.2.0 --root /x", "no flag --root"),
        ("releaser rollout", "needs a subcommand"),
        ("releaser", "needs a subcommand"),
    ] {
        let problems = check(bad);
        assert!(
            problems.iter().any(|p| p.contains(why)),
            "{bad}: expected {why:?}, got {problems:?}"
        );
    }
    // A flag's value is not taken for a subcommand or a flag.
    assert_eq!(check("releaser rollout status --interval --yes"), Vec::<String>::new());
}

#[test]
fn route_matching_and_request_extraction() {
    assert!(route_matches(
        "/admin/agents/{agent_id}/labels",
        "/admin/agents/$AGENT_ID/labels"
    ));
    assert!(route_matches(
        "/admin/agents/{agent_id}/labels",
        "/admin/agents/{agentID}/labels"
    ));
    assert!(route_matches("/admin/agents", "/admin/agents"));
    assert!(!route_matches("/admin/agents", "/admin/agent"));
    assert!(!route_matches(
        "/admin/agents/{agent_id}/labels",
        "/admin/agents/$AGENT_ID"
    ));
    assert!(!route_matches("/tenants/{tenant_id}/sites", "/tenants/$T/site"));
    let routes = parse_routes(
        r#"Router::new()
        .route("/healthz", get(health::healthz))
        .route("/tenants", post(admin::create_tenant).get(admin::list_tenants))
        .route(
            "/tenants/{tenant_id}/api-keys/{key_id}",
            delete(tenant::delete_api_key),
        )
        .route("/admin/desired-versions", put(desired::set).get(desired::list).delete(desired::clear))
        .fallback(not_found)"#,
    );
    assert_eq!(
        routes,
        vec![
            Route {
                path: "/healthz".into(),
                methods: words(&["GET"])
            },
            Route {
                path: "/tenants".into(),
                methods: words(&["GET", "POST"])
            },
            Route {
                path: "/tenants/{tenant_id}/api-keys/{key_id}".into(),
                methods: words(&["DELETE"])
            },
            Route {
                path: "/admin/desired-versions".into(),
                methods: words(&["GET", "PUT", "DELETE"])
            },
        ]
    );
    assert_eq!(
        cp_requests(
            r#"curl "${ADM[@]}" "$CP/admin/agents?site_id=$SITE_ID" | jq .; curl -sS ${CP}/healthz
curl "${TEN[@]}" -X DELETE "$CP/tenants/$T/api-keys/$K"; curl "${ADM[@]}" -d '{}' "$CP"/tenants; echo "$CP/x""#
        ),
        vec![
            ("GET".to_string(), "/admin/agents".to_string()),
            ("GET".to_string(), "/healthz".to_string()),
            ("DELETE".to_string(), "/tenants/$T/api-keys/$K".to_string()),
            ("POST".to_string(), "/tenants".to_string()),
        ]
    );
    assert_eq!(route_problem(&routes, "POST", "/tenants"), None);
    assert!(route_problem(&routes, "PUT", "/tenants").is_some_and(|p| p.contains("answers GET, POST only")));
    assert!(route_problem(&routes, "GET", "/tenant").is_some_and(|p| p.contains("no such")));
    assert_eq!(
        prose_requests("Use `GET /healthz?x=1` or `DELETE /tenants/{tenantID}/api-keys/{keyID}`, not `GET me`.\n"),
        vec![
            (1, "GET".to_string(), "/healthz".to_string()),
            (
                1,
                "DELETE".to_string(),
                "/tenants/{tenantID}/api-keys/{keyID}".to_string()
            ),
        ]
    );
}
