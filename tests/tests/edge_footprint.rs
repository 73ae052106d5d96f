//! Footprint of an idle `nkudo-edge run` (ignored by default; run it explicitly):
//!
//! ```text
//! NKUDO_EDGE_BIN=<static release nkudo-edge> NKUDO_FOOTPRINT_SECS=600 \
//!   cargo test -p nkudo-tests --test edge_footprint -- --ignored --nocapture
//! ```
//!
//! Samples VmRSS/VmHWM every 10 s and the CPU time (utime+stime) over the whole run, with a 1 s heartbeat
//! interval, NetBird (stand-in) connected and one running VM (stand-in) reported in every heartbeat.

use nkudo_tests::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly with --ignored --nocapture"]
async fn idle_agent_footprint() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("NKUDO_FOOTPRINT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-footprint")?;
    host.enroll(&cp, &fx).await?;
    host.spawn(&cp)?;
    let vm = unique("vm");
    let mut start = vm_action("START", &vm);
    start.operation_id = Some("start".into());
    let p = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("fp"), vec![host.create_spec(&vm), start]),
    )
    .await?;
    let done = wait_plan_done(&cp, &fx, &p.plan_id, Duration::from_secs(60)).await?;
    anyhow::ensure!(done.plan_status == "SUCCEEDED", "{done:#?}");
    // Settle, then measure.
    wait_heartbeats(&cp, &fx, 3).await?;
    let tck = 100.0; // USER_HZ on Linux
    let t0 = Instant::now();
    let c0 = host.cpu_ticks()?;
    let (rss0, _) = host.rss_kib()?;
    println!("t(s)  VmRSS(KiB)  VmHWM(KiB)");
    println!("{:>4}  {rss0:>10}  {:>10}", 0, host.rss_kib()?.1);
    let mut max_rss = rss0;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (rss, hwm) = host.rss_kib()?;
        max_rss = max_rss.max(rss);
        println!("{:>4}  {rss:>10}  {hwm:>10}", t0.elapsed().as_secs());
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (host.cpu_ticks()? - c0) as f64 / tck;
    let (rss, hwm) = host.rss_kib()?;
    // Heartbeat interval 1 s ± 10 %: about one heartbeat per second.
    let beats = elapsed;
    println!(
        "idle {elapsed:.0}s: VmRSS start {rss0} KiB, end {rss} KiB, max sampled {max_rss} KiB, VmHWM {hwm} KiB; \
         CPU {cpu:.2}s for ~{beats:.0} heartbeats = {:.2} ms per heartbeat",
        cpu * 1000.0 / beats
    );
    let status = host.stop().await?;
    anyhow::ensure!(status.success(), "{status}");
    Ok(())
}
