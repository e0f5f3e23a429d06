//! `trust-dist policy explain`: what a peer of one tier may do to this node. Every line
//! that can be is answered by the filter itself (`check_assertion` runs a packet standing
//! for the capability through `LinkFilter::decide`), so the explanation cannot drift from
//! what the node enforces.

use std::collections::BTreeMap;
use trust_dist_proto::filter::check_assertion;
use trust_dist_proto::policy::SYSTEM_PROCESS_NAMES;
use trust_dist_proto::{Assertion, Capability, LinkMode, Policy, TierOrder, TierPolicy};

/// Largest message size probed with a real packet; beyond it the configured value is
/// reported as is (the probe would have to build a packet that large).
const MAX_PROBED_SIZE: usize = 64 * 1024 * 1024;

pub struct Engine<'a> {
    policy: Policy,
    order: &'a TierOrder,
    local: &'a str,
    peer: &'a str,
}

impl Engine<'_> {
    /// Whether the filter lets the peer do `capability`.
    fn allows(&self, capability: Capability) -> bool {
        let assertion = Assertion {
            tier: self.peer.to_owned(),
            may: true,
            capability,
        };
        check_assertion(&assertion, &self.policy, self.order, self.local).is_ok()
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "allowed"
    } else {
        "refused"
    }
}

/// The explanation, as lines of text. `Err` names a tier that is not configured.
pub fn explain(
    policy: &Policy,
    order: &TierOrder,
    local: &str,
    peer: &str,
) -> Result<Vec<String>, String> {
    let mode = order.mode(local, peer).ok_or_else(|| {
        let unknown = if order.rank(local).is_none() {
            local
        } else {
            peer
        };
        format!(
            "tier {unknown} is not among the configured tiers [{}]",
            order.tiers().join(", ")
        )
    })?;
    let mut out = Vec::new();
    let chain = order.tiers().join(" > ");
    if mode == LinkMode::Full {
        let engine = Engine {
            policy: policy.clone(),
            order,
            local,
            peer,
        };
        out.push(format!(
            "tier {peer} -> this node (tier {local}; tiers {chain}): FULL"
        ));
        out.push(format!(
            "  {peer} is {} this node's tier: ordinary Distributed Erlang, nothing is filtered.",
            if peer == local {
                "the same as"
            } else {
                "above"
            }
        ));
        out.push(format!(
            "  It may spawn and rpc anything, send to any process, link, exit, monitor, \
             change group leaders, send funs (spawn: {}).",
            yes_no(engine.allows(Capability::Spawn))
        ));
        out.push(
            "  Links across tiers are hidden (no global sync); a peer of the same tier is \
             ordinary."
                .into(),
        );
        return Ok(out);
    }

    let configured = policy.tiers().any(|t| t == peer);
    let tier_policy = policy.for_tier(peer);
    // Judge with audit off, so each line says what the filter decides; audit is reported
    // separately.
    let enforced = {
        let mut map = BTreeMap::new();
        map.insert(
            peer.to_owned(),
            TierPolicy {
                audit: false,
                ..tier_policy.clone()
            },
        );
        Policy::new(map)?
    };
    let e = Engine {
        policy: enforced,
        order,
        local,
        peer,
    };
    out.push(format!(
        "tier {peer} -> this node (tier {local}; tiers {chain}): RESTRICTED{}",
        if configured {
            ""
        } else {
            " (no policy entry: the defaults, answer only)"
        }
    ));
    out.push(format!(
        "  every packet from {peer} is decoded and judged; it may answer what this node asked \
         and reach what it handed out, and beyond that:"
    ));
    if tier_policy.audit {
        out.push(
            "  AUDIT MODE: refusals below are logged and counted, but the packets are \
             delivered"
                .into(),
        );
    } else {
        out.push("  audit: off (refusals are enforced)".into());
    }

    out.push("  registered names it may send to / monitor and call:".into());
    if tier_policy.registered.is_empty() {
        out.push("    (none)".into());
    }
    for name in &tier_policy.registered {
        out.push(format!(
            "    {name}: send {}, monitor {}",
            yes_no(e.allows(Capability::Send(name.clone()))),
            yes_no(e.allows(Capability::Monitor(name.clone())))
        ));
    }
    let unlisted = (0..)
        .map(|i| format!("unlisted_name_{i}"))
        .find(|n| !tier_policy.registered.contains(n))
        .unwrap_or_default();
    out.push(format!(
        "    any other name: send {}, monitor {} (answered noproc)",
        yes_no(e.allows(Capability::Send(unlisted.clone()))),
        yes_no(e.allows(Capability::Monitor(unlisted)))
    ));

    out.push("  functions it may run here (erpc/rpc/spawn of {M, F, A}):".into());
    if tier_policy.rpc.is_empty() {
        out.push("    (none)".into());
    }
    for (m, f, a) in &tier_policy.rpc {
        out.push(format!(
            "    {m}:{f}/{a}: {}",
            yes_no(e.allows(Capability::Call(m.clone(), f.clone(), *a)))
        ));
    }
    out.push(format!(
        "    anything else (os:cmd/1, spawn of a fun or of any other MFA): {} \
         (answered notsup, so the caller fails at once)",
        yes_no(e.allows(Capability::Spawn))
    ));

    let max = tier_policy.max_message_size;
    if max < MAX_PROBED_SIZE {
        out.push(format!(
            "  message size: up to {max} bytes per packet ({max} bytes {}, {} bytes {})",
            yes_no(e.allows(Capability::MessageSize(max))),
            max + 1,
            yes_no(e.allows(Capability::MessageSize(max + 1)))
        ));
    } else {
        out.push(format!("  message size: up to {max} bytes per packet"));
    }
    out.push(format!(
        "  funs in messages: {}",
        yes_no(e.allows(Capability::Funs))
    ));
    let connect = e.allows(Capability::Connect);
    out.push(format!(
        "  connect: {} ({})",
        yes_no(connect),
        if connect {
            format!("{peer} may dial this node")
        } else {
            format!("only this node dials {peer}")
        }
    ));
    out.push(format!(
        "  monitors it may hold here at once: {}",
        tier_policy.max_monitors
    ));
    out.push(format!("  deepest term nesting: {}", tier_policy.max_depth));
    out.push(
        "  new atoms: refused (an atom that does not exist on this node never reaches the VM)"
            .into(),
    );

    out.push("  refused whatever the policy:".into());
    out.push(format!(
        "    exit/2 to this node's processes: {}",
        yes_no(e.allows(Capability::Exit))
    ));
    out.push(format!(
        "    links to this node's processes: {} (answered with a link exit noproc)",
        yes_no(e.allows(Capability::Link))
    ));
    out.push(format!(
        "    group leader changes: {}",
        yes_no(e.allows(Capability::GroupLeader))
    ));
    let reachable = |monitor: bool| -> Vec<&str> {
        SYSTEM_PROCESS_NAMES
            .iter()
            .copied()
            .filter(|n| {
                let name = (*n).to_owned();
                e.allows(if monitor {
                    Capability::Monitor(name)
                } else {
                    Capability::Send(name)
                })
            })
            .collect()
    };
    let describe = |names: Vec<&str>| {
        if names.is_empty() {
            "refused".to_owned()
        } else {
            format!("refused except {}", names.join(", "))
        }
    };
    out.push(format!(
        "    OTP system processes by name ({} names: init, rex, net_kernel, code_server, \
         application_controller, ...): send {}; monitor {}",
        SYSTEM_PROCESS_NAMES.len(),
        describe(reachable(false)),
        describe(reachable(true)),
    ));
    out.push(
        "      (only the exact shapes plain distribution needs pass: a ping's is_auth call \
         to net_kernel, which monitors it, and rex's feature exchange)"
            .into(),
    );
    out.push(
        "    system messages ({system, _, _}), messages shaped like signals ({'EXIT', ...}, \
         {'DOWN', ...}), io requests except to a granted group leader, supervisor and \
         gen_event administration: refused, even to listed names"
            .into(),
    );
    out.push(
        "    pids, ports and references of this node it was not handed, or of a third node: \
         refused"
            .into(),
    );
    Ok(out)
}
