//! Suite 5 of the acceptance plan, with the real agent: every execution's log lines, streamed by the agent in
//! batches, are readable in order through `GET /executions/{id}/logs` (paginated), numbered from 1 per
//! execution, with what the action did; nothing is dropped or duplicated.

use nkudo_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_log_streaming() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-logs")?;
    host.enroll(&cp, &fx).await?;
    host.spawn(&cp)?;
    let vm = unique("vm");
    let ops = ["CREATE", "START", "STOP", "DELETE"];
    let actions = ops
        .iter()
        .map(|op| {
            let mut a = if *op == "CREATE" {
                host.create_spec(&vm)
            } else {
                vm_action(op, &vm)
            };
            a.operation_id = Some(op.to_lowercase());
            a
        })
        .collect();
    let p = apply_plan(&cp, &fx, &plan_request(&unique("logs"), actions)).await?;
    let done = wait_plan_done(&cp, &fx, &p.plan_id, Duration::from_secs(60)).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}");

    let types = ["MicroVMCreate", "MicroVMStart", "MicroVMStop", "MicroVMDelete"];
    for (op, ty) in ops.iter().zip(types) {
        let exec = execution_of(&done, &op.to_lowercase()).clone();
        // The lines may still be on their way (batched every 500 ms): wait for the closing line.
        let lines = poll_until(Duration::from_secs(20), &format!("logs of {op}"), || async {
            let l = all_logs(&cp, &fx.api_key, &exec.id).await?;
            Ok(l.iter().any(|x| x.message.contains("succeeded")).then_some(l))
        })
        .await?;
        let seqs: Vec<i64> = lines.iter().map(|l| l.sequence).collect();
        assert_eq!(
            seqs,
            (1..=lines.len() as i64).collect::<Vec<_>>(),
            "{op}: numbered 1.. in order: {lines:#?}"
        );
        assert!(lines
            .iter()
            .all(|l| l.execution_id == exec.id && l.tenant_id == fx.tenant_id()));
        assert!(lines.iter().all(|l| l.severity == "INFO"), "{lines:#?}");
        assert_eq!(lines.len(), 2, "{op}: started + succeeded: {lines:#?}");
        assert_eq!(lines[0].message, format!("{ty} vm_id={vm} started"), "{lines:#?}");
        assert_eq!(lines[1].message, format!("{ty} succeeded"), "{lines:#?}");
        assert!(lines[0].emitted_at <= lines[1].emitted_at);
        // One page with everything gives the same lines.
        let page = execution_logs(&cp, &fx.api_key, &exec.id, "").await?;
        assert_eq!(page.logs, lines);
        assert!(page.next_after_sequence.is_none());
    }
    // Everything was delivered: the spool is empty.
    poll_until(Duration::from_secs(10), "spool drained", || async {
        Ok((host.spool_len() == 0).then_some(()))
    })
    .await?;
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}
