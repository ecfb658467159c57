//! The SQL admin console's control side: the `console` thread receives the statements
//! that console sessions (`psql … heliosproxy`) send from the shards, runs them against
//! [`Control`], and replies with rows. Shards never wait on it: they poll for the reply.

mod parse;
mod show;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use helios_shard::control::{ConsoleError, ConsoleReply, ConsoleRequest, ConsoleResult, Detail};

use super::{Control, ControlError};
use parse::Command;

/// How often the thread looks at the stop flag while no statement comes.
const IDLE_POLL: Duration = Duration::from_millis(250);

/// How often PAUSE looks whether server connections are still in use.
const PAUSE_POLL: Duration = Duration::from_millis(50);

/// Starts the `console` thread; it ends when `stop` is set or every shard has gone.
pub fn spawn(
    control: Arc<Control>,
    requests: Receiver<ConsoleRequest>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || serve(&control, &requests, &stop))
}

fn serve(control: &Arc<Control>, requests: &Receiver<ConsoleRequest>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let request = match requests.recv_timeout(IDLE_POLL) {
            Ok(request) => request,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let commands = parse::parse_query(&request.sql);
        let pauses = matches!(&commands, Ok(list) if list.contains(&Command::Pause));
        if pauses {
            // PAUSE may wait for the shutdown timeout; RESUME and SHOW must not queue
            // behind it. If no thread can be started, the dropped reply tells the session.
            let waiter = control.clone();
            let spawned = std::thread::Builder::new()
                .name("console-pause".into())
                .spawn(move || answer(&waiter, request, commands));
            if let Err(e) = spawned {
                log::error!("console: cannot start a thread for PAUSE: {e}");
            }
        } else {
            answer(control, request, commands);
        }
    }
}

fn answer(
    control: &Control,
    request: ConsoleRequest,
    commands: Result<Vec<Command>, ConsoleError>,
) {
    let reply = commands.and_then(|commands| execute(control, &request, &commands));
    if let Err(e) = &reply {
        log::info!(
            "console: {} ran \"{}\": {} {}",
            request.user,
            request.sql.trim(),
            e.code,
            e.message
        );
    }
    // The session may have gone meanwhile; nothing to do then.
    let _ = request.reply.send(reply);
}

/// Runs the statements in order; the first error ends the query.
fn execute(control: &Control, request: &ConsoleRequest, commands: &[Command]) -> ConsoleReply {
    if !request.admin {
        if let Some(denied) = commands.iter().find(|c| !c.read_only()) {
            return Err(ConsoleError {
                code: "42501",
                message: format!(
                    "user \"{}\" may only run SHOW commands (stats_users), not {}",
                    request.user,
                    denied.name()
                ),
            });
        }
    }
    commands
        .iter()
        .map(|command| run(control, request, *command))
        .collect()
}

fn run(
    control: &Control,
    request: &ConsoleRequest,
    command: Command,
) -> Result<ConsoleResult, ConsoleError> {
    match command {
        Command::Show(what) => Ok(show::show(control, what)),
        Command::Pause => pause(control, &request.user),
        Command::Resume => {
            control.set_paused(false);
            log::info!("console: RESUME by {}", request.user);
            Ok(done("RESUME"))
        }
        Command::Reload => match control.reload() {
            Ok(report) => {
                log::info!("console: RELOAD by {} ({report:?})", request.user);
                Ok(done("RELOAD"))
            }
            Err(e) => Err(reload_error(e)),
        },
        Command::KillClient(id) => {
            if control.kill_client(id) {
                log::info!("console: KILL_CLIENT {id} by {}", request.user);
                Ok(done("KILL_CLIENT"))
            } else {
                Err(ConsoleError {
                    code: "42704",
                    message: format!("no client with id {id} (see SHOW CLIENTS)"),
                })
            }
        }
        Command::Refused(why) => Err(ConsoleError {
            code: "0A000",
            message: why.into(),
        }),
    }
}

fn reload_error(e: ControlError) -> ConsoleError {
    let code = match e {
        ControlError::InvalidConfig(_) => "F0000",
        ControlError::NodeNotFound | ControlError::Conflict(_) | ControlError::Failed(_) => "XX000",
    };
    ConsoleError {
        code,
        message: format!("configuration not reloaded, the running one is kept: {e}"),
    }
}

/// Closes the gate on every shard, then waits (bounded by the shutdown timeout) until no
/// server connection is in use, so that whatever the operator does next sees none busy.
fn pause(control: &Control, user: &str) -> Result<ConsoleResult, ConsoleError> {
    control.set_paused(true);
    log::info!("console: PAUSE by {user}");
    let limit = Duration::from_secs(control.config().timeouts.shutdown_timeout_secs);
    let deadline = Instant::now() + limit;
    loop {
        let active: usize = control
            .gather(Detail::default())
            .iter()
            .flat_map(|s| s.pools.iter())
            .map(|p| p.active())
            .sum();
        if active == 0 {
            return Ok(done("PAUSE"));
        }
        if Instant::now() >= deadline {
            return Err(ConsoleError {
                code: "57014",
                message: format!(
                    "PAUSE is in effect, but {active} server connection(s) are still in use after {} s",
                    limit.as_secs()
                ),
            });
        }
        std::thread::sleep(PAUSE_POLL);
    }
}

/// A command's result without rows.
fn done(tag: &str) -> ConsoleResult {
    ConsoleResult {
        tag: tag.into(),
        ..ConsoleResult::default()
    }
}
