//! The control plane goes away in the middle of a plan and comes back on the same address with the same data:
//! the agent keeps executing the leased plan, keeps its results and log lines in its on-disk spool, backs off
//! (no hammering), and delivers everything in order when the control plane is back: nothing is lost.
//!
//! The outage lasts `NKUDO_TEST_CP_OUTAGE_SECS` seconds (default 15; the acceptance scenario's minute is
//! `NKUDO_TEST_CP_OUTAGE_SECS=60`): the behaviour is the same, only the backoff climbs higher. The agent's
//! backoff cap is lowered to 4 s (`NKUDO_MAX_BACKOFF`) so that it notices the return within seconds.

use nkudo_core::api::PlanActionSpec;
use nkudo_tests::*;
use std::time::{Duration, Instant};

fn op(mut a: PlanActionSpec, id: &str) -> PlanActionSpec {
    a.operation_id = Some(id.to_string());
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_nothing_lost_all_delivered_in_order() -> anyhow::Result<()> {
    let outage = Duration::from_secs(
        std::env::var("NKUDO_TEST_CP_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15),
    );
    let port = free_port()?;
    let mut cp = start_or_skip!(edge_control_plane(Backend::Sqlite)
        .env("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}"))
        .start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-outage")?;
    host.enroll(&cp, &fx).await?;
    host.set_env("MOCK_CH_DELAY_MS", "200");
    host.set_env("NKUDO_MAX_BACKOFF", "4s");
    host.spawn(&cp)?;
    let (a, b) = (unique("vm"), unique("vm"));
    let ops = ["create-a", "start-a", "create-b", "start-b", "stop-a"];
    let p = apply_plan(
        &cp,
        &fx,
        &plan_request(
            &unique("outage"),
            vec![
                op(host.create_spec(&a), ops[0]),
                op(vm_action("START", &a), ops[1]),
                op(host.create_spec(&b), ops[2]),
                op(vm_action("START", &b), ops[3]),
                op(vm_action("STOP", &a), ops[4]),
            ],
        ),
    )
    .await?;

    // As soon as the agent holds the plan, the control plane goes down.
    poll_until(Duration::from_secs(30), "the agent started the plan", || async {
        Ok(host.action_record("create-a")?.map(|_| ()))
    })
    .await?;
    let st = cp.stop().await?;
    assert!(st.success());
    let down_at = Instant::now();

    // The agent carries on without it: every action finishes locally, results and logs wait in the spool.
    poll_until(
        outage.max(Duration::from_secs(30)),
        "all actions done while the CP is down",
        || async {
            let mut all = true;
            for id in ops {
                all &= host.action_record(id)?.is_some_and(|r| r["state"] == "succeeded");
            }
            Ok(all.then_some(()))
        },
    )
    .await?;
    // The last actions finished after the control plane went down: their results wait in the spool.
    let spooled = host.spool_len();
    let pending = host.spooled_results();
    for id in &ops[3..] {
        assert!(
            pending.iter().any(|a| a == id),
            "result of {id} waits on disk: {pending:?}"
        );
    }
    assert!(
        host.is_running(),
        "the agent keeps running while the control plane is away"
    );
    // Stay down for the rest of the outage (the scenario's length, not a wait for a condition).
    if let Some(rest) = outage.checked_sub(down_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert!(host.is_running());
    assert!(
        host.spool_len() >= spooled,
        "nothing was dropped or lost while the CP was away"
    );
    let failures = host.log().matches("heartbeat failed").count();
    let secs = down_at.elapsed().as_secs() as usize;
    assert!(failures >= 2, "the agent kept trying: {failures}");
    assert!(
        failures < secs,
        "backoff, not one attempt per interval: {failures} in {secs}s\n{}",
        host.log_tail(3000)
    );

    // Back on the same address with the same data: everything arrives.
    cp.restart().await?;
    assert!(cp.base_url.ends_with(&format!(":{port}")), "{}", cp.base_url);
    let done = wait_plan_done(&cp, &fx, &p.plan_id, Duration::from_secs(60)).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(4000));
    assert!(done.executions.iter().all(|e| e.state == "SUCCEEDED"), "{done:#?}");
    poll_until(Duration::from_secs(30), "spool drained", || async {
        Ok((host.spool_len() == 0).then_some(()))
    })
    .await?;
    // Each execution's lines, in order, none missing: started then succeeded, numbered 1 and 2.
    for id in ops {
        let exec = execution_of(&done, id).id.clone();
        let lines = all_logs(&cp, &fx.api_key, &exec).await?;
        let seqs: Vec<i64> = lines.iter().map(|l| l.sequence).collect();
        assert_eq!(seqs, vec![1, 2], "{id}: {lines:#?}");
        assert!(
            lines[0].message.ends_with("started") && lines[1].message.ends_with("succeeded"),
            "{lines:#?}"
        );
    }
    // Executions completed in plan order (their completion times are the agent's).
    let done_at: Vec<String> = ops
        .iter()
        .map(|id| execution_of(&done, id).completed_at.clone().unwrap_or_default())
        .collect();
    assert!(done_at.windows(2).all(|w| w[0] <= w[1]), "{done_at:?}");
    assert_eq!(site_vm(&cp, &fx, &a).await?.state, "STOPPED");
    assert_eq!(site_vm(&cp, &fx, &b).await?.state, "RUNNING");
    poll_until(Duration::from_secs(30), "heartbeats again", || async {
        Ok(host.log().contains("control plane reachable again").then_some(()))
    })
    .await?;
    assert!(!host.log().contains("dropped"), "{}", host.log_tail(3000));
    // The site is ONLINE again.
    poll_until(Duration::from_secs(30), "site ONLINE", || async {
        Ok((site_of(&cp, &fx).await?.connectivity_state == "ONLINE").then_some(()))
    })
    .await?;
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// The spool is bounded: with room for 10 entries and the control plane away, a 6-action plan (18 entries)
/// overflows it; the oldest log lines are dropped (and counted), no result is ever dropped, and everything kept
/// is delivered in order once the control plane is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_drops_oldest_logs_never_results() -> anyhow::Result<()> {
    let port = free_port()?;
    let mut cp = start_or_skip!(edge_control_plane(Backend::Sqlite)
        .env("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}"))
        .start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-spool")?;
    host.enroll(&cp, &fx).await?;
    host.set_env("MOCK_CH_DELAY_MS", "100");
    host.set_env("NKUDO_MAX_BACKOFF", "2s");
    host.set_env("NKUDO_SPOOL_MAX_ENTRIES", "10");
    host.spawn(&cp)?;
    let vms: Vec<String> = (0..3).map(|_| unique("vm")).collect();
    let mut actions = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        actions.push(op(host.create_spec(vm), &format!("create-{i}")));
        actions.push(op(vm_action("START", vm), &format!("start-{i}")));
    }
    let ops: Vec<String> = actions.iter().filter_map(|a| a.operation_id.clone()).collect();
    let p = apply_plan(&cp, &fx, &plan_request(&unique("spool"), actions)).await?;
    poll_until(Duration::from_secs(30), "the agent started the plan", || async {
        Ok(host.action_record("create-0")?.map(|_| ()))
    })
    .await?;
    cp.stop().await?;
    poll_until(
        Duration::from_secs(60),
        "all actions done while the CP is down",
        || async {
            let mut all = true;
            for id in &ops {
                all &= host.action_record(id)?.is_some_and(|r| r["state"] == "succeeded");
            }
            Ok(all.then_some(()))
        },
    )
    .await?;
    let pending = host.spooled_results();
    assert!(
        host.spool_len() <= 10 + pending.len(),
        "bounded: {} entries",
        host.spool_len()
    );
    assert!(host.log().contains("spool full"), "{}", host.log_tail(3000));
    let dropped = host.state()?["dropped_log_entries"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "the drops are counted in the state file");

    cp.restart().await?;
    let done = wait_plan_done(&cp, &fx, &p.plan_id, Duration::from_secs(60)).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "no result was dropped: {done:#?}");
    assert!(done.executions.iter().all(|e| e.state == "SUCCEEDED"), "{done:#?}");
    poll_until(Duration::from_secs(30), "spool drained", || async {
        Ok((host.spool_len() == 0).then_some(()))
    })
    .await?;
    // The newest lines survived: the last action's two lines are there, in order; older ones may be missing.
    let last = execution_of(&done, "start-2").id.clone();
    let lines = all_logs(&cp, &fx.api_key, &last).await?;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].sequence < lines[1].sequence);
    let mut total = 0;
    for id in &ops {
        let e = execution_of(&done, id).id.clone();
        let l = all_logs(&cp, &fx.api_key, &e).await?;
        assert!(l.windows(2).all(|w| w[0].sequence < w[1].sequence), "{l:#?}");
        total += l.len();
    }
    assert!(total < ops.len() * 2, "some old lines were dropped: {total}");
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}
