//! What a lower tier may do to this node: the per-tier options of the configuration, the
//! system processes no option can expose, and the assertions a deployment states about
//! its own policy.
//!
//! The default for a tier with no entry is "answer only" (DESIGN §3): replies to what
//! this node asked, messages to what it handed out, nothing else.

use std::collections::{BTreeMap, BTreeSet};

/// Largest message a lower tier may send unless its policy says otherwise.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 8 * 1024 * 1024;
/// Monitors a lower-tier peer may hold on this node's processes at once, by default.
pub const DEFAULT_MAX_MONITORS: usize = 10_000;
/// Deepest nesting of a term from a lower tier.
pub const DEFAULT_MAX_DEPTH: usize = 512;

/// Registered names of OTP's own processes. A lower tier can never send to these by
/// name, whatever the configuration lists (the configuration is refused if it tries),
/// and their pids stay unreachable even if they appear in data sent to the peer. The
/// only exceptions are the exact shapes plain distribution needs: a ping's `is_auth`
/// call to `net_kernel` and `rex`'s feature exchange.
pub const SYSTEM_PROCESS_NAMES: &[&str] = &[
    "init",
    "erl_prim_loader",
    "erts_code_purger",
    "erts_literal_area_collector",
    "erts_dirty_process_signal_handler",
    "erl_signal_server",
    "code_server",
    "application_controller",
    "kernel_sup",
    "kernel_safe_sup",
    "kernel_refc",
    "kernel_config",
    "net_sup",
    "net_kernel",
    "auth",
    "erl_epmd",
    "rex",
    "global_name_server",
    "global_group",
    "global_group_check",
    "inet_db",
    "file_server_2",
    "user",
    "user_drv",
    "standard_error",
    "standard_error_sup",
    "logger",
    "logger_sup",
    "logger_handler_watcher",
    "logger_proxy",
    "logger_std_h_default",
    "error_logger",
    "pg",
    "dist_ac",
    "timer_server",
    "socket_registry",
    "inet_gethost_native",
    "inet_gethost_native_sup",
    "disk_log_server",
    "disk_log_sup",
    "release_handler",
    "alarm_handler",
    "sasl_sup",
    "overload",
    "trust_dist_server",
    "heart",
    "user_drv_reader",
    "user_drv_writer",
    "erl_reply",
    "prim_tty_sighandler",
];

pub fn is_system_name(name: &str) -> bool {
    SYSTEM_PROCESS_NAMES.contains(&name)
}

/// What a lower tier may do, as configured for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPolicy {
    /// Registered names the tier may send to, monitor and call.
    pub registered: BTreeSet<String>,
    /// `{Module, Function, Arity}` the tier may run here through `erpc`/`rpc`/`spawn`.
    pub rpc: BTreeSet<(String, String, u32)>,
    pub max_message_size: usize,
    /// Whether closures and `fun M:F/A` may appear in what the tier sends.
    pub funs: bool,
    /// Whether the tier may open connections to this node.
    pub connect: bool,
    /// Log-only: refusals are logged and counted, and the packet is delivered anyway.
    pub audit: bool,
    pub max_monitors: usize,
    pub max_depth: usize,
}

impl Default for TierPolicy {
    fn default() -> Self {
        TierPolicy {
            registered: BTreeSet::new(),
            rpc: BTreeSet::new(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            funs: false,
            connect: false,
            audit: false,
            max_monitors: DEFAULT_MAX_MONITORS,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

impl TierPolicy {
    pub fn allows_rpc(&self, module: &str, function: &str, arity: u32) -> bool {
        self.rpc
            .contains(&(module.to_owned(), function.to_owned(), arity))
    }
}

/// The policy of every lower tier this node has an entry for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    tiers: BTreeMap<String, TierPolicy>,
}

impl Policy {
    /// Fails with a message naming the tier and the option if a tier lists a system
    /// process, which no configuration can expose.
    pub fn new(tiers: BTreeMap<String, TierPolicy>) -> Result<Self, String> {
        for (tier, p) in &tiers {
            if let Some(name) = p.registered.iter().find(|n| is_system_name(n)) {
                return Err(format!(
                    "tier {tier}: registered name {name} is an OTP system process; \
                     lower tiers can never reach those (expose a process of your own instead)"
                ));
            }
            if p.max_message_size == 0 {
                return Err(format!("tier {tier}: max_message_size must be positive"));
            }
        }
        Ok(Policy { tiers })
    }

    /// The policy for `tier`: its entry, or the default "answer only".
    pub fn for_tier(&self, tier: &str) -> TierPolicy {
        self.tiers.get(tier).cloned().unwrap_or_default()
    }

    pub fn tiers(&self) -> impl Iterator<Item = &String> {
        self.tiers.keys()
    }
}

/// Something a tier may or may not do to this node; the subject of an assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Spawn arbitrary code here (`spawn/4`, `erpc` of a function not allowlisted).
    Spawn,
    /// Run `M:F/A` here through `erpc`.
    Call(String, String, u32),
    /// Send to the registered name.
    Send(String),
    /// Monitor (and so `GenServer.call`) the registered name.
    Monitor(String),
    /// Open a connection to this node.
    Connect,
    /// Send an exit signal (`exit/2`) to one of this node's processes.
    Exit,
    /// Link to one of this node's processes.
    Link,
    /// Change the group leader of one of this node's processes.
    GroupLeader,
    /// Send funs.
    Funs,
    /// Send a message of this many bytes.
    MessageSize(usize),
}

/// "Tier T may / may not do X", checked when the node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    pub tier: String,
    pub may: bool,
    pub capability: Capability,
}
