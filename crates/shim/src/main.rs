//! `containerd-shim-crumble-v1`: containerd's runtime `io.containerd.crumble.v1`.
//! Each container runs in a crumblecracker VM (one `cc::Instance` per shim
//! process); containerd starts the shim with the bundle as its working
//! directory and talks to it over ttrpc (the task v2 API).

mod metrics;
mod oom;
mod service;
mod spec;
mod state;
mod stdio;

use std::sync::Arc;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

use service::Service;

/// The status containerd reports for a task whose shim died: killed.
const DEAD_SHIM_STATUS: u32 = oom::KILLED;

struct Shim {
    exit: Arc<ExitSignal>,
    namespace: String,
    /// This shim's socket (`unix://…`), removed when containerd cleans up
    /// after the shim died.
    socket: String,
    service: Service,
}

impl containerd_shim::Shim for Shim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let exit = Arc::new(ExitSignal::default());
        Shim {
            service: Service::new(exit.clone()),
            exit,
            namespace: args.namespace.clone(),
            socket: containerd_shim::socket_address(&args.address, &args.namespace, &args.id),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // One shim (one VM) per container, or per pod: a pod's member
        // container goes to the shim of its sandbox, whose socket is
        // named after the sandbox's id. Without a live shim there, a new
        // one starts and its Create fails naming the missing sandbox.
        let config = std::fs::read("config.json").unwrap_or_default();
        let grouping = spec::shim_group(&config).unwrap_or_else(|| opts.id.clone());
        let existing = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        let address = if grouping != opts.id && shim_listens(&existing) {
            existing
        } else {
            containerd_shim::spawn(opts, &grouping, Vec::new())?.1
        };
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let bundle = std::env::current_dir().map_err(|e| containerd_shim::Error::IoError {
            context: "the bundle (working directory)".into(),
            err: e,
        })?;
        let st = state::clean_up_after_dead_shim(&bundle);
        if let Some(path) = self.socket.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
        }
        Ok(DeleteResponse {
            pid: st.vm_pid,
            exit_status: DEAD_SHIM_STATUS,
            exited_at: MessageField::some(Timestamp::now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        self.service
            .with_publisher(publisher, self.namespace.clone())
    }
}

/// Whether a shim answers on `address` (`unix://…`).
fn shim_listens(address: &str) -> bool {
    address
        .strip_prefix("unix://")
        .is_some_and(|path| std::os::unix::net::UnixStream::connect(path).is_ok())
}

fn main() {
    let config = Config {
        // The engine waits for QEMU and its helpers itself: a reaper here
        // would take their exits away from it.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<Shim>("io.containerd.crumble.v1", Some(config));
}
