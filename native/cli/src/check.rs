//! `trust-dist check`: the checks a node makes of its `sys.config` when distribution
//! starts (erl_src/trust_dist_config.erl, then the NIF's identity loading), made offline,
//! all of them, one line each, with the fix.

use crate::sysconfig::{self, Term};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use trust_dist_proto::cert::node_matches;
use trust_dist_proto::{
    Assertion, Capability, Certificate, CertificateBody, Policy, PublicKey, Revocations, SecretKey,
    TierOrder, TierPolicy,
};

/// Keys of the `trust_dist` section, as `trust_dist_config` knows them.
pub const KNOWN_KEYS: &[&str] = &[
    "identity",
    "certificate",
    "authorities",
    "tiers",
    "listen",
    "ports",
    "policy",
    "assertions",
    "revoked",
    "busy_poll_us",
];
/// Options of one tier's policy.
pub const POLICY_OPTIONS: &[&str] = &[
    "registered",
    "rpc",
    "max_message_size",
    "funs",
    "connect",
    "audit",
    "max_monitors",
    "max_depth",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Fail,
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    pub status: Status,
    pub subject: String,
    pub text: String,
}

/// What the checks found and could read, for `policy explain` too.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<Line>,
    pub tiers: Option<TierOrder>,
    pub policy: Option<Policy>,
    /// This node's certificate as read (verified or not).
    pub certificate: Option<CertificateBody>,
    pub node_name: Option<String>,
}

impl Report {
    fn ok(&mut self, subject: &str, text: impl Into<String>) {
        self.push(Status::Ok, subject, text.into());
    }
    fn fail(&mut self, subject: &str, text: impl Into<String>) {
        self.push(Status::Fail, subject, text.into());
    }
    fn skip(&mut self, subject: &str, text: impl Into<String>) {
        self.push(Status::Skip, subject, text.into());
    }
    fn push(&mut self, status: Status, subject: &str, text: String) {
        self.lines.push(Line {
            status,
            subject: subject.into(),
            text,
        });
    }

    pub fn failed(&self) -> bool {
        self.lines.iter().any(|l| l.status == Status::Fail)
    }

    pub fn print(&self) {
        for l in &self.lines {
            let tag = match l.status {
                Status::Ok => "ok  ",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            println!("{tag} {}: {}", l.subject, l.text);
        }
    }
}

/// Reads the `trust_dist` section of a sys.config (and of the files it includes).
/// `Err` is a usage error (the file cannot be read); problems in it are report lines.
pub fn check(config: &Path, node: Option<&str>, now: u64) -> Result<Report, String> {
    let text =
        fs::read_to_string(config).map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let mut r = Report::default();
    let Some(section) = section(&mut r, config, &text) else {
        return Ok(r);
    };
    let env = keys(&mut r, &section);

    // Tiers first: the policy, the assertions and the certificate's tier depend on them.
    let tiers = match env.get("tiers") {
        None => {
            r.fail("tiers", missing("tiers", "[admin, worker, edge]"));
            None
        }
        Some(t) => match tiers(t) {
            Ok(order) => {
                r.ok("tiers", order.tiers().join(" > "));
                Some(order)
            }
            Err(e) => {
                r.fail("tiers", e);
                None
            }
        },
    };

    let secret = identity(&mut r, env.get("identity"));
    let certificate = certificate(&mut r, env.get("certificate"));
    let authorities = authorities(&mut r, env.get("authorities"));
    r.certificate = certificate.as_ref().map(|c| c.body().clone());

    // The certificate judged as the node judges it at boot.
    let mut verified = None;
    match (&certificate, &authorities) {
        (Some(cert), Some(auths)) => match cert.verify(auths, now) {
            Ok(body) => {
                r.ok(
                    "certificate",
                    format!(
                        "signed by authority {}, valid until {} ({})",
                        body.issuer,
                        crate::utc(body.not_after),
                        crate::days_left(body.not_after, now)
                    ),
                );
                verified = Some(body.clone());
            }
            Err(e) => {
                let fix = match e {
                    trust_dist_proto::CertError::UnknownAuthority(_) => {
                        "Fix: add that authority's .pub to authorities, or issue a certificate \
                         from a listed one (trust-dist node new / node rotate)"
                    }
                    trust_dist_proto::CertError::Expired { .. } => {
                        "Fix: trust-dist node rotate NAME@HOST --authority DIR --out DIR"
                    }
                    trust_dist_proto::CertError::NotYetValid { .. } => {
                        "Fix: check this machine's clock, or issue a certificate valid now"
                    }
                    _ => "Fix: issue a new certificate (trust-dist node new / node rotate)",
                };
                r.fail("certificate", format!("{e}. {fix}"));
            }
        },
        _ => r.skip(
            "certificate",
            "signature and validity not checked (certificate or authorities unreadable)",
        ),
    }

    match (&certificate, &secret) {
        (Some(cert), Some(key)) => {
            let body = cert.body();
            if body.public_key == key.public() {
                r.ok(
                    "certificate",
                    format!("is for the identity key {}", key.public().fingerprint()),
                );
            } else {
                r.fail(
                    "certificate",
                    format!(
                        "is for key {}, but the identity key is {}; they do not belong \
                         together. Fix: point identity and certificate at the .key and .cert \
                         of one node",
                        body.public_key.fingerprint(),
                        key.public().fingerprint()
                    ),
                );
            }
        }
        _ => r.skip(
            "certificate",
            "key match not checked (identity or certificate unreadable)",
        ),
    }

    // The node name: --node, else the vm.args next to the config.
    let name = match node {
        Some(n) => Some((n.to_owned(), "--node".to_owned())),
        None => vm_args_name(&mut r, config),
    };
    match (&certificate, &name) {
        (Some(cert), Some((name, from))) => {
            let pattern = &cert.body().node;
            if node_matches(pattern, name) {
                r.ok(
                    "certificate",
                    format!("covers node name {name} ({pattern}; name from {from})"),
                );
            } else {
                r.fail(
                    "certificate",
                    format!(
                        "is for node {pattern:?}, but this node is {name:?} (from {from}). Fix: \
                         issue a certificate for {name} (trust-dist node new {name} ...), or \
                         correct the node name"
                    ),
                );
            }
        }
        (_, None) => r.skip(
            "certificate",
            "node name not checked: pass --node NAME@HOST, or keep a vm.args with -name next \
             to the config",
        ),
        (None, Some(_)) => r.skip(
            "certificate",
            "node name not checked (certificate unreadable)",
        ),
    }
    r.node_name = name.map(|(n, _)| n);

    match (&certificate, &tiers) {
        (Some(cert), Some(order)) => {
            let tier = &cert.body().tier;
            if order.rank(tier).is_some() {
                r.ok("tiers", format!("this node's tier {tier} is listed"));
            } else {
                r.fail(
                    "tiers",
                    format!(
                        "this node's certificate tier {tier:?} is not in tiers [{}]. Fix: add \
                         it, in its place in the order, on every node",
                        order.tiers().join(", ")
                    ),
                );
            }
        }
        _ => r.skip("tiers", "this node's tier not checked"),
    }

    r.tiers = tiers.clone();

    if let Some(listen) = env.get("listen") {
        match check_listen(listen) {
            Ok(text) => r.ok("listen", text),
            Err(e) => r.fail("listen", e),
        }
    }
    if let Some(ports) = env.get("ports") {
        match check_ports(ports) {
            Ok(n) => r.ok("ports", format!("{n} static ports")),
            Err(e) => r.fail("ports", e),
        }
    }
    if let Some(busy_poll) = env.get("busy_poll_us") {
        match check_busy_poll(busy_poll) {
            Ok(0) => r.ok(
                "busy_poll_us",
                "0: the transport thread sleeps as soon as it is idle",
            ),
            Ok(us) => r.ok("busy_poll_us", format!("{us} µs")),
            Err(e) => r.fail("busy_poll_us", e),
        }
    }

    if let Some(order) = &tiers {
        match build_policy(env.get("policy"), order) {
            Ok(policy) => {
                let named: Vec<&String> = policy.tiers().collect();
                r.ok(
                    "policy",
                    if named.is_empty() {
                        "no entries: every lower tier may only answer".to_owned()
                    } else {
                        format!(
                            "entries for {}",
                            named
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                );
                r.policy = Some(policy);
            }
            Err(e) => r.fail("policy", e),
        }
        match build_assertions(env.get("assertions"), order) {
            Ok(list) => {
                let local = certificate.as_ref().map(|c| c.body().tier.clone());
                match (r.policy.clone(), local) {
                    (Some(policy), Some(local)) if order.rank(&local).is_some() => {
                        for (text, a) in &list {
                            match trust_dist_proto::filter::check_assertion(
                                a, &policy, order, &local,
                            ) {
                                Ok(()) => r.ok("assertions", format!("{text} holds")),
                                Err(e) => r.fail(
                                    "assertions",
                                    format!("{e}. Fix: change the policy or the assertion"),
                                ),
                            }
                        }
                        if list.is_empty() {
                            r.ok("assertions", "none");
                        }
                    }
                    _ if list.is_empty() => r.ok("assertions", "none"),
                    _ => r.skip(
                        "assertions",
                        "not checked (they need a valid policy and this node's tier)",
                    ),
                }
            }
            Err(e) => r.fail("assertions", e),
        }
    } else {
        r.skip("policy", "not checked (tiers invalid)");
        r.skip("assertions", "not checked (tiers invalid)");
    }

    let own = verified.or_else(|| r.certificate.clone());
    revoked(&mut r, env.get("revoked"), own);

    if let Some(vm_args) = vm_args_text(config) {
        let args: Vec<&str> = vm_args.split_whitespace().collect();
        if args.windows(2).any(|w| w == ["-proto_dist", "trust"]) {
            r.ok("vm.args", "has -proto_dist trust");
        } else {
            r.fail(
                "vm.args",
                "has no -proto_dist trust line, so distribution will not use trust_dist. \
                 Fix: add -proto_dist trust",
            );
        }
    }
    Ok(r)
}

fn missing(key: &str, example: &str) -> String {
    format!(
        "is missing. Fix: add {{{key}, {example}}} to the trust_dist section \
         (trust-dist dev-cluster writes a complete example)"
    )
}

/// Finds the trust_dist section, following included config files.
fn section(r: &mut Report, config: &Path, text: &str) -> Option<Vec<Term>> {
    let term = match sysconfig::parse(text) {
        Ok(t) => t,
        Err(e) => {
            r.fail(
                "sys.config",
                format!(
                    "{}: {e}. Fix: correct the syntax (it must be read by file:consult/1)",
                    config.display()
                ),
            );
            return None;
        }
    };
    let Term::List(apps) = term else {
        r.fail(
            "sys.config",
            "is not a list; write [{trust_dist, [...]}].".to_owned(),
        );
        return None;
    };
    let mut entries = Vec::new();
    let mut found = false;
    let mut from = vec![config.display().to_string()];
    // Included files first: the file's own settings override them.
    for app in &apps {
        if let Some(path) = app.text() {
            let mut path = PathBuf::from(path);
            if path.extension().is_none() {
                path.set_extension("config");
            }
            match fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| sysconfig::parse(&t).map_err(|e| e.to_string()))
            {
                Ok(Term::List(inner)) => {
                    for a in inner {
                        if let Some(env) = app_env(&a, "trust_dist") {
                            found = true;
                            entries.extend(env);
                            from.push(path.display().to_string());
                        }
                    }
                }
                Ok(_) => {
                    r.fail(
                        "sys.config",
                        format!("included file {} is not a list", path.display()),
                    );
                    return None;
                }
                Err(e) => {
                    r.fail(
                        "sys.config",
                        format!("included file {}: {e}", path.display()),
                    );
                    return None;
                }
            }
        }
    }
    for app in &apps {
        if let Some(env) = app_env(app, "trust_dist") {
            found = true;
            entries.extend(env);
        } else if app.text().is_none() && !matches!(app, Term::Tuple(t) if t.len() == 2) {
            r.fail(
                "sys.config",
                format!("{app} is neither {{Application, [{{Key, Value}}]}} nor a file name"),
            );
            return None;
        }
    }
    if !found {
        r.fail(
            "sys.config",
            format!(
                "{} has no {{trust_dist, [...]}} section. Fix: add one (trust-dist dev-cluster \
                 writes a complete example)",
                config.display()
            ),
        );
        return None;
    }
    r.ok("sys.config", format!("parsed {}", from.join(", ")));
    Some(entries)
}

fn app_env(app: &Term, name: &str) -> Option<Vec<Term>> {
    match app {
        Term::Tuple(t) if t.len() == 2 && t[0].atom() == Some(name) => {
            Some(t[1].list().unwrap_or_else(|| vec![t[1].clone()]))
        }
        _ => None,
    }
}

/// The section as key => value; unknown, malformed and repeated keys are failures.
fn keys(r: &mut Report, section: &[Term]) -> BTreeMap<String, Term> {
    let mut env = BTreeMap::new();
    let mut bad = false;
    for entry in section {
        match entry {
            Term::Tuple(kv) if kv.len() == 2 && kv[0].atom().is_some() => {
                let key = kv[0].atom().unwrap_or_default().to_owned();
                if key == "included_applications" {
                    continue;
                }
                if !KNOWN_KEYS.contains(&key.as_str()) {
                    r.fail(
                        "keys",
                        format!(
                            "unknown key {}; known keys are {}. Fix: correct or remove it",
                            kv[0],
                            KNOWN_KEYS.join(", ")
                        ),
                    );
                    bad = true;
                } else if env.insert(key.clone(), kv[1].clone()).is_some() {
                    r.fail("keys", format!("{key} is given twice. Fix: keep one"));
                    bad = true;
                }
            }
            other => {
                r.fail(
                    "keys",
                    format!("{other} is not a {{Key, Value}} entry of the trust_dist section"),
                );
                bad = true;
            }
        }
    }
    if !bad {
        r.ok("keys", "all known");
    }
    env
}

/// The tier list, by trust_dist_config's rules.
pub fn tiers(t: &Term) -> Result<TierOrder, String> {
    let list = t.list().filter(|l| !l.is_empty()).ok_or_else(|| {
        format!(
            "must be a non-empty list of tier names, highest first (for example [admin, \
             worker, edge]), got {t}"
        )
    })?;
    let mut names = Vec::new();
    for item in &list {
        match item.atom() {
            Some(a) if trust_dist_proto::cert::is_valid_tier(a) => names.push(a.to_owned()),
            _ => {
                return Err(format!(
                    "{item} is not a tier name: use lowercase atoms such as admin, worker, edge"
                ))
            }
        }
    }
    TierOrder::new(names).map_err(|e| format!("{e}: {t}"))
}

fn path_of(key: &str, value: Option<&Term>, example: &str) -> Result<String, String> {
    match value {
        None => Err(missing(key, example)),
        Some(v) => v
            .text()
            .ok_or_else(|| format!("must be a file path string, got {v}")),
    }
}

fn read_file(path: &str) -> Result<String, String> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{path} does not exist (relative paths are from the directory the node starts \
             in; this check ran in {}). Fix: correct the path or create the file",
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        )),
        Err(e) => Err(format!(
            "cannot read {path}: {e}. Fix: make it readable by the node's user"
        )),
    }
}

fn identity(r: &mut Report, value: Option<&Term>) -> Option<SecretKey> {
    let path = match path_of("identity", value, "\"keys/NAME.key\"") {
        Ok(p) => p,
        Err(e) => {
            r.fail("identity", e);
            return None;
        }
    };
    let text = match read_file(&path) {
        Ok(t) => t,
        Err(e) => {
            r.fail("identity", e);
            return None;
        }
    };
    let mode = fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    let key = match SecretKey::from_pkcs8_pem(&text) {
        Ok(k) => k,
        Err(e) => {
            r.fail(
                "identity",
                format!("{path}: {e}. Fix: point identity at the node's .key file"),
            );
            return None;
        }
    };
    if mode & 0o077 != 0 {
        r.fail(
            "identity",
            format!(
                "private key {path} has mode {mode:o}; other users may read it, and the node \
                 refuses to start. Fix: chmod 600 {path}"
            ),
        );
    } else {
        r.ok(
            "identity",
            format!("{path}: key {}, mode {mode:o}", key.public().fingerprint()),
        );
    }
    Some(key)
}

fn certificate(r: &mut Report, value: Option<&Term>) -> Option<Certificate> {
    let path = match path_of("certificate", value, "\"keys/NAME.cert\"") {
        Ok(p) => p,
        Err(e) => {
            r.fail("certificate", e);
            return None;
        }
    };
    match read_file(&path).and_then(|t| {
        Certificate::from_pem(&t)
            .map_err(|e| format!("{path}: {e}. Fix: point certificate at the node's .cert file"))
    }) {
        Ok(c) => {
            let b = c.body();
            r.ok(
                "certificate",
                format!(
                    "{path}: node {} tier {} serial {}",
                    b.node, b.tier, b.serial
                ),
            );
            Some(c)
        }
        Err(e) => {
            r.fail("certificate", e);
            None
        }
    }
}

fn authorities(r: &mut Report, value: Option<&Term>) -> Option<Vec<PublicKey>> {
    let Some(value) = value else {
        r.fail(
            "authorities",
            missing("authorities", "[\"keys/authority.pub\"]"),
        );
        return None;
    };
    let paths: Vec<String> = if let Some(single) = value.text() {
        vec![single]
    } else {
        match value.list().filter(|l| !l.is_empty()) {
            Some(items) => {
                let mut paths = Vec::new();
                for item in items {
                    match item.text() {
                        Some(p) => paths.push(p),
                        None => {
                            r.fail(
                                "authorities",
                                format!("must be a file path string, got {item}"),
                            );
                            return None;
                        }
                    }
                }
                paths
            }
            None => {
                r.fail(
                    "authorities",
                    format!("must be a non-empty list of public key files, got {value}"),
                );
                return None;
            }
        }
    };
    let mut keys = Vec::new();
    let mut ok = true;
    for path in &paths {
        match read_file(path).and_then(|t| {
            PublicKey::from_spki_pem(&t)
                .map_err(|e| format!("{path}: {e}. Fix: list the authority's .pub file"))
        }) {
            Ok(k) => {
                r.ok("authorities", format!("{path}: authority {}", k.key_id()));
                keys.push(k);
            }
            Err(e) => {
                r.fail("authorities", e);
                ok = false;
            }
        }
    }
    ok.then_some(keys)
}

fn vm_args_text(config: &Path) -> Option<String> {
    let path = config.parent()?.join("vm.args");
    fs::read_to_string(path).ok()
}

/// `-name N` (or `-sname N`) from the vm.args next to the config.
fn vm_args_name(r: &mut Report, config: &Path) -> Option<(String, String)> {
    let text = vm_args_text(config)?;
    let mut words = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split_whitespace());
    while let Some(w) = words.next() {
        if w == "-name" || w == "-sname" {
            let name = words.next()?;
            if name.contains('@') {
                return Some((name.to_owned(), "vm.args".into()));
            }
            r.skip(
                "certificate",
                format!("vm.args gives {w} {name} without a host; pass --node NAME@HOST"),
            );
            return None;
        }
    }
    None
}

fn check_listen(t: &Term) -> Result<String, String> {
    let Term::Map(pairs) = t else {
        return Err(format!("must be a map such as #{{port => 4370}}, got {t}"));
    };
    let mut text = Vec::new();
    for (k, v) in pairs {
        match k.atom() {
            Some("ip") => {
                let ok = match v {
                    Term::Atom(a) => a == "any",
                    Term::Tuple(parts) => {
                        (parts.len() == 4
                            && parts
                                .iter()
                                .all(|p| p.int().is_some_and(|i| (0..=255).contains(&i))))
                            || (parts.len() == 8
                                && parts
                                    .iter()
                                    .all(|p| p.int().is_some_and(|i| (0..=65535).contains(&i))))
                    }
                    other => other
                        .text()
                        .is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok()),
                };
                if !ok {
                    return Err(format!("ip {v} is not an IP address"));
                }
                text.push(format!("ip {v}"));
            }
            Some("port") => {
                if !v.int().is_some_and(|p| (0..=65535).contains(&p)) {
                    return Err(format!(
                        "port {v} is not a UDP port number (0..65535; 0 = any)"
                    ));
                }
                text.push(format!("port {v}"));
            }
            _ => return Err(format!("unknown option {k}; known options are ip and port")),
        }
    }
    Ok(if text.is_empty() {
        "defaults (any address, any port)".into()
    } else {
        text.join(", ")
    })
}

fn check_ports(t: &Term) -> Result<usize, String> {
    let Term::Map(pairs) = t else {
        return Err(format!("must be a map of node name to UDP port, got {t}"));
    };
    for (k, v) in pairs {
        if k.atom().is_none() || !v.int().is_some_and(|p| (1..=65535).contains(&p)) {
            return Err(format!(
                "entry {k} => {v} must map a node name atom to a UDP port"
            ));
        }
    }
    Ok(pairs.len())
}

/// As trust_dist_config checks it.
fn check_busy_poll(t: &Term) -> Result<i128, String> {
    const MAX: i128 = 1_000;
    match t.int() {
        Some(us) if (0..=MAX).contains(&us) => Ok(us),
        _ => Err(format!(
            "must be an integer from 0 (off) to {MAX} microseconds, got {t}"
        )),
    }
}

fn tier_of(key: &str, t: &Term, order: &TierOrder) -> Result<String, String> {
    match t.atom() {
        Some(a) if order.rank(a).is_some() => Ok(a.to_owned()),
        _ => Err(format!(
            "{key} names tier {t}, which is not in tiers [{}]",
            order.tiers().join(", ")
        )),
    }
}

/// The policy, by trust_dist_config's rules and then [`Policy::new`], as the node builds it.
pub fn build_policy(t: Option<&Term>, order: &TierOrder) -> Result<Policy, String> {
    let empty = Term::Map(vec![]);
    let t = t.unwrap_or(&empty);
    let Term::Map(entries) = t else {
        return Err(format!(
            "must be a map of tier => options, such as #{{worker => #{{registered => \
             [results]}}}}, got {t}"
        ));
    };
    let mut map = BTreeMap::new();
    for (tier, options) in entries {
        let tier = tier_of("policy", tier, order)?;
        let Term::Map(options) = options else {
            return Err(format!(
                "tier {tier}: options must be a map such as #{{registered => [results]}}, got \
                 {options}"
            ));
        };
        let mut p = TierPolicy::default();
        for (k, v) in options {
            let name = k.atom().unwrap_or("");
            match name {
                "registered" => {
                    let names = v.list().and_then(|l| {
                        l.iter()
                            .map(|n| n.atom().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                    });
                    p.registered = names
                        .ok_or_else(|| {
                            format!(
                                "tier {tier}: registered must be a list of registered names \
                                 (atoms), got {v}"
                            )
                        })?
                        .into_iter()
                        .collect();
                }
                "rpc" => {
                    let mfas = v.list().and_then(|l| {
                        l.iter()
                            .map(|m| match m {
                                Term::Tuple(t) if t.len() == 3 => Some((
                                    t[0].atom()?.to_owned(),
                                    t[1].atom()?.to_owned(),
                                    u32::try_from(t[2].int()?).ok().filter(|a| *a <= 255)?,
                                )),
                                _ => None,
                            })
                            .collect::<Option<Vec<_>>>()
                    });
                    p.rpc = mfas
                        .ok_or_else(|| {
                            format!(
                                "tier {tier}: rpc must be a list of {{Module, Function, Arity}}, \
                                 got {v}"
                            )
                        })?
                        .into_iter()
                        .collect();
                }
                "max_message_size" | "max_monitors" | "max_depth" => {
                    let n = v
                        .int()
                        .filter(|n| *n > 0)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| {
                            format!("tier {tier}: {name} must be a positive integer, got {v}")
                        })?;
                    match name {
                        "max_message_size" => p.max_message_size = n,
                        "max_monitors" => p.max_monitors = n,
                        _ => p.max_depth = n,
                    }
                }
                "funs" | "connect" | "audit" => {
                    let b = v.boolean().ok_or_else(|| {
                        format!("tier {tier}: {name} must be true or false, got {v}")
                    })?;
                    match name {
                        "funs" => p.funs = b,
                        "connect" => p.connect = b,
                        _ => p.audit = b,
                    }
                }
                _ => {
                    return Err(format!(
                        "tier {tier}: unknown option {k}; known options are {}",
                        POLICY_OPTIONS.join(", ")
                    ))
                }
            }
        }
        map.insert(tier, p);
    }
    Policy::new(map)
}

/// The assertions, each with its text as written.
pub fn build_assertions(
    t: Option<&Term>,
    order: &TierOrder,
) -> Result<Vec<(String, Assertion)>, String> {
    let Some(t) = t else {
        return Ok(Vec::new());
    };
    let list = t
        .list()
        .ok_or_else(|| format!("must be a list such as [{{worker, may_not, spawn}}], got {t}"))?;
    let mut out = Vec::new();
    for a in &list {
        let Term::Tuple(parts) = a else {
            return Err(format!(
                "{a} is not an assertion; write {{Tier, may | may_not, Capability}}"
            ));
        };
        let may = match parts.get(1).and_then(Term::atom) {
            Some("may") if parts.len() == 3 => true,
            Some("may_not") if parts.len() == 3 => false,
            _ => {
                return Err(format!(
                    "{a} is not an assertion; write {{Tier, may | may_not, Capability}}"
                ))
            }
        };
        let tier = tier_of("assertions", &parts[0], order)?;
        let what = &parts[2];
        let unknown = || {
            format!(
                "{a}: unknown capability {what}; use spawn, {{call, M, F, A}}, {{send, Name}}, \
                 {{monitor, Name}}, connect, exit, link, group_leader, funs or {{message_size, \
                 Bytes}}"
            )
        };
        let capability = match what {
            Term::Atom(w) => match w.as_str() {
                "spawn" => Capability::Spawn,
                "connect" => Capability::Connect,
                "exit" => Capability::Exit,
                "link" => Capability::Link,
                "group_leader" => Capability::GroupLeader,
                "funs" => Capability::Funs,
                _ => return Err(unknown()),
            },
            Term::Tuple(w) => match (w.first().and_then(Term::atom), w.len()) {
                (Some("call"), 4) => match (w[1].atom(), w[2].atom(), w[3].int()) {
                    (Some(m), Some(f), Some(ar)) if (0..=255).contains(&ar) => {
                        Capability::Call(m.into(), f.into(), ar as u32)
                    }
                    _ => return Err(unknown()),
                },
                (Some("send"), 2) => Capability::Send(w[1].atom().ok_or_else(unknown)?.into()),
                (Some("monitor"), 2) => {
                    Capability::Monitor(w[1].atom().ok_or_else(unknown)?.into())
                }
                (Some("message_size"), 2) => Capability::MessageSize(
                    w[1].int()
                        .filter(|n| *n > 0)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(unknown)?,
                ),
                _ => return Err(unknown()),
            },
            _ => return Err(unknown()),
        };
        out.push((
            a.to_string(),
            Assertion {
                tier,
                may,
                capability,
            },
        ));
    }
    Ok(out)
}

fn revoked(r: &mut Report, value: Option<&Term>, body: Option<CertificateBody>) {
    let Some(value) = value else {
        r.ok("revoked", "no revocation list configured");
        return;
    };
    let Some(path) = value.text() else {
        r.fail(
            "revoked",
            format!("must be a file path string, got {value}"),
        );
        return;
    };
    let list = match read_file(&path).and_then(|t| {
        Revocations::parse(&t).map_err(|e| {
            format!("{path}: {e}; the node refuses to start with it. Fix: correct that line")
        })
    }) {
        Ok(l) => l,
        Err(e) => {
            r.fail("revoked", e);
            return;
        }
    };
    r.ok("revoked", format!("{path}: {} entries", list.len()));
    match body {
        Some(b) => match list.check(&b, &b.public_key.fingerprint()) {
            None => r.ok("revoked", "this node is not revoked"),
            Some(why) => r.fail(
                "revoked",
                format!(
                    "this node's own {why} in {path}; every peer will refuse it. Fix: trust-dist \
                     node rotate, then use the new key and certificate"
                ),
            ),
        },
        None => r.skip(
            "revoked",
            "this node's revocation not checked (certificate unreadable)",
        ),
    }
}
