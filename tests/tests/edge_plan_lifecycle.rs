//! Suite 2 of the acceptance plan, with the real agent and the Cloud Hypervisor stand-in: a plan of
//! CREATE/START/STOP/DELETE applied through the API is leased by `nkudo-edge run`, executed through the provider,
//! every execution ends SUCCEEDED and the VM moves STOPPED → RUNNING → STOPPED → DELETED in `GET /sites/{id}/vms`.
//! A VM whose boot fails (`MOCK_CH_FAIL_BOOT=1`) gives a FAILED execution with the provider's error code and a
//! message, and the rest of the plan is cancelled.

use nkudo_tests::*;
use std::time::Duration;

const PLAN_TIMEOUT: Duration = Duration::from_secs(60);

async fn vm_state_is(cp: &ControlPlane, fx: &Fixture, vm_id: &str, state: &str) -> anyhow::Result<()> {
    poll_until(Duration::from_secs(30), &format!("VM {vm_id} {state}"), || async {
        let vm = site_vm(cp, fx, vm_id).await?;
        anyhow::ensure!(vm.state == state, "VM is {} (updated {})", vm.state, vm.updated_at);
        Ok(Some(()))
    })
    .await
}

async fn create_start_stop_delete(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(backend).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-lifecycle")?;
    let agent_id = host.enroll(&cp, &fx).await?;
    host.spawn(&cp)?;
    let vm = unique("vm");

    // CREATE + START in one plan.
    let p1 = apply_plan(
        &cp,
        &fx,
        &plan_request(
            &unique("up"),
            vec![host.create_spec(&vm), {
                let mut a = vm_action("START", &vm);
                a.operation_id = Some(format!("start-{vm}"));
                a
            }],
        ),
    )
    .await?;
    let done = wait_plan_done(&cp, &fx, &p1.plan_id, PLAN_TIMEOUT).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(4000));
    for e in &done.executions {
        assert_eq!(e.state, "SUCCEEDED", "{e:#?}");
        assert_eq!(e.agent_id.as_deref(), Some(agent_id.as_str()), "{e:#?}");
        assert!(e.completed_at.is_some(), "{e:#?}");
    }
    vm_state_is(&cp, &fx, &vm, "RUNNING").await?;
    let listed = site_vm(&cp, &fx, &vm).await?;
    assert_eq!((listed.vcpu_count, listed.memory_mib), (2, 256), "{listed:#?}");
    // The VMM (stand-in) really got the payload: kernel, command line, disk.
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(
        host.runtime_dir.join(&vm).join("api.sock.vmconfig.json"),
    )?)?;
    assert_eq!(
        cfg["payload"]["kernel"],
        host.kernel_path.to_string_lossy().as_ref(),
        "{cfg:#}"
    );
    assert_eq!(cfg["payload"]["cmdline"], "console=ttyS0 root=/dev/vda rw", "{cfg:#}");
    assert_eq!(host.vmm_calls(&vm, "PUT vm.boot"), 1, "{:?}", host.vmm_requests(&vm));

    // STOP.
    let p2 = apply_plan(&cp, &fx, &plan_request(&unique("stop"), vec![vm_action("STOP", &vm)])).await?;
    let done = wait_plan_done(&cp, &fx, &p2.plan_id, PLAN_TIMEOUT).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(4000));
    vm_state_is(&cp, &fx, &vm, "STOPPED").await?;

    // DELETE: the VM stays listed as DELETED; its runtime directory is gone.
    let p3 = apply_plan(&cp, &fx, &plan_request(&unique("del"), vec![vm_action("DELETE", &vm)])).await?;
    let done = wait_plan_done(&cp, &fx, &p3.plan_id, PLAN_TIMEOUT).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(4000));
    vm_state_is(&cp, &fx, &vm, "DELETED").await?;
    assert!(!host.runtime_dir.join(&vm).exists(), "runtime directory removed");

    // Every execution of the site is SUCCEEDED; the agent's idempotency cache holds one record per action.
    let all = site_executions(&cp, &fx).await?;
    assert_eq!(all.len(), 4, "{all:#?}");
    assert!(all.iter().all(|e| e.state == "SUCCEEDED"), "{all:#?}");
    let st = host.state()?;
    let records = st["actions"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 4, "{st:#}");
    assert!(
        records.iter().all(|r| r["attempts"] == 1 && r["state"] == "succeeded"),
        "{st:#}"
    );

    // SIGTERM: exit 0.
    let status = host.stop().await?;
    assert!(status.success(), "{status}\n{}", host.log_tail(3000));
    Ok(())
}

both_backends!(create_start_stop_delete => create_start_stop_delete_sqlite, create_start_stop_delete_postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_boot_gives_a_failed_execution_with_its_error() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-failboot")?;
    host.enroll(&cp, &fx).await?;
    host.set_env("MOCK_CH_FAIL_BOOT", "1");
    host.spawn(&cp)?;
    let vm = unique("vm");
    let mut start = vm_action("START", &vm);
    start.operation_id = Some("start".into());
    let mut stop = vm_action("STOP", &vm);
    stop.operation_id = Some("stop".into());
    let mut create = host.create_spec(&vm);
    create.operation_id = Some("create".into());
    let p = apply_plan(&cp, &fx, &plan_request(&unique("boot"), vec![create, start, stop])).await?;
    let done = wait_plan_done(&cp, &fx, &p.plan_id, PLAN_TIMEOUT).await?;
    assert_eq!(done.plan_status, "FAILED", "{done:#?}");
    let create = execution_of(&done, "create");
    assert_eq!(create.state, "SUCCEEDED", "{create:#?}");
    let start = execution_of(&done, "start");
    assert_eq!(start.state, "FAILED", "{start:#?}");
    assert_eq!(start.error_code.as_deref(), Some("BOOT_FAILED"), "{start:#?}");
    let msg = start.error_message.clone().unwrap_or_default();
    assert!(
        msg.contains("injected boot failure"),
        "the VMM's error chain is in the message: {msg:?}"
    );
    let stop = execution_of(&done, "stop");
    assert_eq!(
        stop.state, "CANCELLED",
        "the rest of a failed plan is cancelled: {stop:#?}"
    );
    // The agent never ran the action after the failure.
    assert!(host.action_record("stop")?.is_none(), "{:#}", host.state()?);
    vm_state_is(&cp, &fx, &vm, "ERROR").await?;
    // The failure is in the execution's log too.
    let logs = all_logs(&cp, &fx.api_key, &start.id).await?;
    assert!(
        logs.iter()
            .any(|l| l.severity == "ERROR" && l.message.contains("BOOT_FAILED")),
        "{logs:#?}"
    );
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// A VMM that dies after a good boot (`MOCK_CH_CRASH_AFTER_BOOT_MS`): the provider sees it, the next heartbeats
/// report the VM as `ERROR`, and the control plane shows it; the agent restarted later still reports it so (the
/// provider rediscovers VMs from their runtime directories).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vmm_shows_as_error_through_heartbeats() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-crash")?;
    host.enroll(&cp, &fx).await?;
    host.set_env("MOCK_CH_CRASH_AFTER_BOOT_MS", "1500");
    host.spawn(&cp)?;
    let vm = unique("vm");
    let mut start = vm_action("START", &vm);
    start.operation_id = Some("start".into());
    let p = apply_plan(
        &cp,
        &fx,
        &plan_request(&unique("crash"), vec![host.create_spec(&vm), start]),
    )
    .await?;
    let done = wait_plan_done(&cp, &fx, &p.plan_id, PLAN_TIMEOUT).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}\n{}", host.log_tail(3000));
    vm_state_is(&cp, &fx, &vm, "ERROR").await?;
    // Restart the agent: the VM is rediscovered and still reported as ERROR.
    let st = host.stop().await?;
    assert!(st.success());
    host.spawn(&cp)?;
    wait_heartbeats(&cp, &fx, 2).await?;
    assert_eq!(site_vm(&cp, &fx, &vm).await?.state, "ERROR");
    let st = host.stop().await?;
    assert!(st.success());
    Ok(())
}
