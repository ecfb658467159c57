//! Applies the control plane's commands on a shard and builds its reports. Runs in the
//! shard's housekeeping task, between queries, never inside one.

use crossbeam_channel::Receiver;

use crate::context::ShardCtx;
use crate::control::{ClientReport, ControlMsg, Detail, ServerReport, ShardSnapshot};

/// Handles every command waiting in the mailbox.
pub fn drain(ctx: &ShardCtx, mailbox: &Receiver<ControlMsg>) {
    while let Ok(msg) = mailbox.try_recv() {
        handle(ctx, msg);
    }
}

fn handle(ctx: &ShardCtx, msg: ControlMsg) {
    match msg {
        ControlMsg::Topology(topology) => ctx.apply_topology(&topology),
        ControlMsg::Config(config) => {
            if let Err(e) = ctx.apply_config(config) {
                log::error!("shard {}: reloaded configuration not applied: {e}", ctx.id);
            }
        }
        ControlMsg::Snapshot { detail, reply } => {
            let _ = reply.send(snapshot(ctx, detail));
        }
        ControlMsg::Pause(paused) => ctx.gate.set_closed(paused),
        ControlMsg::KillClient { pid, reply } => {
            let _ = reply.send(ctx.cancels.kill(pid));
        }
    }
}

/// This shard's pools, and its clients and servers when asked.
pub fn snapshot(ctx: &ShardCtx, detail: Detail) -> ShardSnapshot {
    let config = ctx.config();
    let pools = ctx.all_pools();
    let sessions = if detail.clients || detail.servers {
        ctx.cancels.sessions()
    } else {
        Vec::new()
    };
    let node_of = |addr: &crate::nodeaddr::NodeAddr| {
        ctx.nodes
            .borrow()
            .iter()
            .find(|n| n.addr == *addr)
            .map(|n| n.address.to_string())
            .unwrap_or_else(|| addr.to_string())
    };
    let clients = if detail.clients {
        sessions
            .iter()
            .map(|s| ClientReport {
                pid: s.id,
                user: s.info.user.to_string(),
                database: s.info.database.to_string(),
                addr: s.info.addr,
                connected: s.info.connected,
                application_name: s.info.application_name.as_deref().unwrap_or("").into(),
                active: s.attached(),
                server: s.target().map(|t| t.addr),
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut servers = Vec::new();
    if detail.servers {
        for pool in &pools {
            servers.extend(pool.idle_servers());
        }
        for s in &sessions {
            if let Some(target) = s.target() {
                servers.push(ServerReport {
                    id: target.backend_id,
                    node: node_of(&target.addr),
                    database: s.info.database.to_string(),
                    user: s.info.user.to_string(),
                    addr: target.addr,
                    local_port: 0,
                    backend_pid: target.key.pid,
                    connected: None,
                    idle: false,
                });
            }
        }
    }
    ShardSnapshot {
        shard: ctx.id,
        paused: ctx.gate.is_closed(),
        clients_active: ctx.stats.clients_active(),
        pools: pools
            .iter()
            .map(|p| {
                let mut report = p.report();
                report.mode = Some(config.pool_mode_for(&report.user, &report.database));
                report
            })
            .collect(),
        clients,
        servers,
        routes: ctx.router.decisions(),
    }
}
