//! The agent dies in the middle of a plan (SIGKILL, no chance to clean up) and is started again: the plan
//! completes, no finished action is executed again (the stand-in VMM's record of REST calls shows one boot per
//! VM), the interrupted action runs again (idempotent) and says so in its log, and log sequences never repeat.
//! And SIGTERM: the current action finishes, the next does not start, the spool is flushed, exit 0.

use nkudo_core::api::PlanActionSpec;
use nkudo_tests::*;
use std::time::Duration;

fn op(mut a: PlanActionSpec, id: &str) -> PlanActionSpec {
    a.operation_id = Some(id.to_string());
    a
}

/// create-a, start-a, create-b, start-b.
fn two_vms(host: &EdgeHost, a: &str, b: &str) -> Vec<PlanActionSpec> {
    vec![
        op(host.create_spec(a), "create-a"),
        op(vm_action("START", a), "start-a"),
        op(host.create_spec(b), "create-b"),
        op(vm_action("START", b), "start-b"),
    ]
}

async fn record_state(host: &EdgeHost, action: &str, state: &str, timeout: Duration) -> anyhow::Result<()> {
    poll_until(timeout, &format!("{action} recorded {state}"), || async {
        Ok(host
            .action_record(action)?
            .is_some_and(|r| r["state"] == state)
            .then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_plan_resumes_without_repeating() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-kill")?;
    host.enroll(&cp, &fx).await?;
    // Every VMM answer 300 ms late: a start takes a while, long enough to be killed in the middle.
    host.set_env("MOCK_CH_DELAY_MS", "300");
    host.spawn(&cp)?;
    let (a, b) = (unique("vm"), unique("vm"));
    let p = apply_plan(&cp, &fx, &plan_request(&unique("kill"), two_vms(&host, &a, &b))).await?;

    // Kill the agent while start-a is in progress: recorded as started, and the VMM already got vm.create.
    record_state(&host, "create-a", "succeeded", Duration::from_secs(30)).await?;
    poll_until(
        Duration::from_secs(30),
        "start-a in the middle (VMM got vm.create)",
        || async {
            let started = host.action_record("start-a")?.is_some_and(|r| r["state"] == "started");
            Ok((started && host.vmm_calls(&a, "PUT vm.create") == 1).then_some(()))
        },
    )
    .await?;
    host.kill9().await?;
    assert_eq!(
        host.vmm_calls(&a, "PUT vm.boot"),
        0,
        "killed before the boot: {:?}",
        host.vmm_requests(&a)
    );
    assert!(host.action_record("create-b")?.is_none());

    // Start it again: the plan completes.
    host.spawn(&cp)?;
    let done = wait_plan_done(&cp, &fx, &p.plan_id, Duration::from_secs(90)).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(5000));
    assert!(done.executions.iter().all(|e| e.state == "SUCCEEDED"), "{done:#?}");
    for vm in [&a, &b] {
        assert_eq!(site_vm(&cp, &fx, vm).await?.state, "RUNNING");
        // One VM config and one boot per VM at the VMM: nothing was executed twice.
        assert_eq!(
            host.vmm_calls(vm, "PUT vm.create"),
            1,
            "{vm}: {:?}",
            host.vmm_requests(vm)
        );
        assert_eq!(
            host.vmm_calls(vm, "PUT vm.boot"),
            1,
            "{vm}: {:?}",
            host.vmm_requests(vm)
        );
    }
    // The cache: the finished action ran once; the interrupted one twice (its first attempt never finished).
    let attempts = |id: &str| -> anyhow::Result<i64> {
        Ok(host
            .action_record(id)?
            .map(|r| r["attempts"].as_i64().unwrap_or(0))
            .unwrap_or(0))
    };
    assert_eq!(attempts("create-a")?, 1);
    assert_eq!(attempts("start-a")?, 2);
    assert_eq!(attempts("create-b")?, 1);
    assert_eq!(attempts("start-b")?, 1);

    // start-a's log: both attempts, strictly increasing sequences across the restart (none reused), the
    // interruption explained.
    let exec = execution_of(&done, "start-a").id.clone();
    let lines = poll_until(Duration::from_secs(20), "start-a logs", || async {
        let l = all_logs(&cp, &fx.api_key, &exec).await?;
        Ok(l.iter().any(|x| x.message.contains("succeeded")).then_some(l))
    })
    .await?;
    assert!(lines.windows(2).all(|w| w[0].sequence < w[1].sequence), "{lines:#?}");
    assert_eq!(lines[0].sequence, 1);
    assert!(
        lines
            .iter()
            .any(|l| l.severity == "WARN" && l.message.contains("interrupted")),
        "{lines:#?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.message.ends_with("started")).count(),
        2,
        "{lines:#?}"
    );
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_current_action_and_exits_cleanly() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-term")?;
    host.enroll(&cp, &fx).await?;
    host.set_env("MOCK_CH_DELAY_MS", "600");
    host.spawn(&cp)?;
    let (a, b) = (unique("vm"), unique("vm"));
    let p = apply_plan(&cp, &fx, &plan_request(&unique("term"), two_vms(&host, &a, &b))).await?;
    poll_until(Duration::from_secs(30), "start-a in progress", || async {
        Ok(host
            .action_record("start-a")?
            .is_some_and(|r| r["state"] == "started")
            .then_some(()))
    })
    .await?;
    // The heartbeat told the control plane that the action is under way.
    wait_execution(&cp, &fx, &p.plan_id, "start-a", "IN_PROGRESS", Duration::from_secs(10)).await?;
    host.signal("TERM")?;
    let status = host.wait_exit(Duration::from_secs(60)).await?;
    assert!(status.success(), "SIGTERM exits 0: {status}\n{}", host.log_tail(3000));
    // The current action finished and was reported; the next one never started.
    assert_eq!(
        host.action_record("start-a")?.map(|r| r["state"].clone()),
        Some("succeeded".into())
    );
    assert!(host.action_record("create-b")?.is_none(), "{:#}", host.state()?);
    assert_eq!(host.spool_len(), 0, "the spool was flushed before exit");
    let plan = get_plan(&cp, &fx, &p.plan_id).await?;
    assert_eq!(execution_of(&plan, "start-a").state, "SUCCEEDED", "{plan:#?}");
    assert_eq!(execution_of(&plan, "create-b").state, "PENDING", "{plan:#?}");
    assert_eq!(host.vmm_calls(&a, "PUT vm.boot"), 1);

    // A new start picks up the rest.
    host.spawn(&cp)?;
    let done = wait_plan_done(&cp, &fx, &p.plan_id, Duration::from_secs(90)).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(4000));
    assert_eq!(host.vmm_calls(&a, "PUT vm.boot"), 1);
    assert_eq!(host.vmm_calls(&b, "PUT vm.boot"), 1);
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}
