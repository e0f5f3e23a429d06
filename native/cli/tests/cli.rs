//! `trust-dist` as operators and scripts run it: exit codes, files written, refusals.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use trust_dist_proto::{Certificate, Revocations, SecretKey};

const BIN: &str = env!("CARGO_BIN_EXE_trust-dist");

fn run(args: &[&str]) -> (i32, String) {
    run_stdin(args, None)
}

fn run_stdin(args: &[&str], stdin: Option<&str>) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("writes");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("waits");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A fresh directory, removed when dropped.
struct Tmp(PathBuf);
impl Tmp {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "trust-dist-cli-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&dir).expect("tmp dir");
        Tmp(dir)
    }
    fn path(&self, rest: &str) -> String {
        self.0.join(rest).display().to_string()
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &str) -> u32 {
    fs::metadata(path).expect("exists").permissions().mode() & 0o777
}

fn cert(path: &str) -> Certificate {
    Certificate::from_pem(&fs::read_to_string(path).expect("cert")).expect("parses")
}

fn key(path: &str) -> SecretKey {
    SecretKey::from_pkcs8_pem(&fs::read_to_string(path).expect("key")).expect("parses")
}

/// A deployment of a (admin), b (worker), c (edge) under `t`.
fn cluster(t: &Tmp) {
    let (code, out) = run(&[
        "dev-cluster",
        &t.path("c"),
        "a@127.0.0.1:admin",
        "b@127.0.0.1:worker",
        "e@127.0.0.1:edge",
        "--ebin",
        &t.path(""),
    ]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn help_exits_zero_for_every_command() {
    let leaves: &[&[&str]] = &[
        &["authority", "new"],
        &["node", "new"],
        &["node", "rotate"],
        &["cert", "show"],
        &["cert", "verify"],
        &["revoke"],
        &["check"],
        &["policy", "explain"],
        &["dev-cluster"],
    ];
    for cmd in leaves {
        let mut args = cmd.to_vec();
        args.push("--help");
        let (code, out) = run(&args);
        assert_eq!(code, 0, "{cmd:?}: {out}");
        assert!(
            out.contains("Exit codes"),
            "{cmd:?} documents exit codes: {out}"
        );
    }
    for group in [
        &["--help"][..],
        &["authority", "--help"],
        &["node", "--help"],
        &["cert", "--help"],
        &["policy", "--help"],
    ] {
        let (code, out) = run(group);
        assert_eq!(code, 0, "{group:?}: {out}");
    }
    let (code, _) = run(&["revoke"]);
    assert_eq!(code, 2, "missing arguments are a usage error");
    let (code, _) = run(&["no-such-command"]);
    assert_eq!(code, 2);
}

#[test]
fn rotate_keeps_name_and_tier_and_changes_key() {
    let t = Tmp::new("rotate");
    let auth = t.path("auth");
    let out = t.path("nodes");
    assert_eq!(run(&["authority", "new", &auth]).0, 0);
    let (code, text) = run(&[
        "node",
        "new",
        "web-1@10.0.0.7",
        "--tier",
        "worker",
        "--authority",
        &auth,
        "--out",
        &out,
    ]);
    assert_eq!(code, 0, "{text}");
    let key_path = t.path("nodes/web-1.key");
    let cert_path = t.path("nodes/web-1.cert");
    let old_cert = cert(&cert_path);
    let old_key_text = fs::read_to_string(&key_path).expect("key");

    // node new never overwrites without --force.
    let (code, text) = run(&[
        "node",
        "new",
        "web-1@10.0.0.7",
        "--tier",
        "worker",
        "--authority",
        &auth,
        "--out",
        &out,
    ]);
    assert_eq!(code, 2);
    assert!(text.contains("--force"), "{text}");
    assert_eq!(fs::read_to_string(&key_path).expect("key"), old_key_text);

    let rotate = |extra: &[&str]| {
        let mut args = vec![
            "node",
            "rotate",
            "web-1@10.0.0.7",
            "--authority",
            &auth,
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (code, text) = rotate(&["--valid-days", "30"]);
    assert_eq!(code, 0, "{text}");
    let new_cert = cert(&cert_path);
    let (old_body, new_body) = (old_cert.body(), new_cert.body());
    assert_eq!(new_body.node, old_body.node);
    assert_eq!(new_body.tier, old_body.tier);
    assert_ne!(new_body.serial, old_body.serial);
    assert_ne!(new_body.public_key, old_body.public_key);
    assert_eq!(key(&key_path).public(), new_body.public_key);
    assert!(new_body.not_after - new_body.not_before <= 31 * 86_400);
    assert_eq!(mode(&key_path), 0o600);
    assert_eq!(mode(&t.path("nodes/web-1.key.old")), 0o600);
    assert_eq!(
        fs::read_to_string(t.path("nodes/web-1.key.old")).expect("old key"),
        old_key_text
    );
    assert_eq!(cert(&t.path("nodes/web-1.cert.old")), old_cert);
    assert!(text.contains(&old_body.public_key.fingerprint()), "{text}");
    assert!(text.contains(&new_body.public_key.fingerprint()), "{text}");

    // A second rotation would replace the .old files: only with --force.
    let (code, text) = rotate(&[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--force"), "{text}");
    assert_eq!(cert(&cert_path), new_cert, "nothing changed");
    let (code, text) = rotate(&["--force"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(cert(&t.path("nodes/web-1.cert.old")), new_cert);

    // The name must be the certificate's; there must be a certificate.
    let (code, text) = run(&[
        "node",
        "rotate",
        "web-1@10.0.0.8",
        "--authority",
        &auth,
        "--out",
        &out,
        "--force",
    ]);
    assert_eq!(code, 2);
    assert!(text.contains("not \"web-1@10.0.0.8\""), "{text}");
    let (code, text) = run(&[
        "node",
        "rotate",
        "ghost@h",
        "--authority",
        &auth,
        "--out",
        &out,
    ]);
    assert_eq!(code, 2);
    assert!(text.contains("node new"), "{text}");
}

#[test]
fn revoke_appends_parseable_lines_and_rejects_garbage() {
    let t = Tmp::new("revoke");
    let auth = t.path("auth");
    let out = t.path("nodes");
    assert_eq!(run(&["authority", "new", &auth]).0, 0);
    assert_eq!(
        run(&[
            "node",
            "new",
            "a@h",
            "--tier",
            "worker",
            "--authority",
            &auth,
            "--out",
            &out
        ])
        .0,
        0
    );
    let c = cert(&t.path("nodes/a.cert"));
    let fp = c.body().public_key.fingerprint();
    let list = t.path("keys/revoked.list");

    let (code, text) = run(&["revoke", &list, "--key", &fp, "--comment", "laptop stolen"]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = run(&["revoke", &list, "--cert", &t.path("nodes/a.cert")]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = run(&["revoke", &list, "--serial", "0706A2A3BED0F527", "42"]);
    assert_eq!(code, 0, "{text}");
    let written = fs::read_to_string(&list).expect("list");
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines.len(), 3, "{written}");
    assert_eq!(lines[0], format!("key {fp}  # laptop stolen"));
    assert!(lines[1].starts_with(&format!("serial {} {}", c.body().issuer, c.body().serial)));
    assert_eq!(lines[2], "serial 0706a2a3bed0f527 42");
    let parsed = Revocations::parse(&written).expect("parses");
    assert_eq!(parsed.len(), 3);
    assert!(parsed.check(c.body(), &fp).is_some());

    // Again: already there, nothing appended.
    let (code, text) = run(&["revoke", &list, "--key", &fp]);
    assert_eq!(code, 0);
    assert!(text.contains("already revoked"), "{text}");
    assert_eq!(fs::read_to_string(&list).expect("list"), written);

    for bad in [
        &["--key", "SHA256:short"][..],
        &["--key", "3rYPJrLC2Ky0N5I2"],
        &["--key", "SHA256:3rYPJrLC2Ky0N5I2 # x"],
        &["--serial", "nothex0000000000", "1"],
        &["--serial", "0706a2a3bed0f527", "-1"],
        &["--serial", "0706a2a3bed0f527"],
        &["--key", &fp, "--comment", "two\nlines"],
        &["--key", &fp, "--serial", "0706a2a3bed0f527", "1"],
        &["--cert", &t.path("nodes/a.key")],
        &[],
    ] {
        let mut args = vec!["revoke", list.as_str()];
        args.extend_from_slice(bad);
        let (code, text) = run(&args);
        assert_eq!(code, 2, "{bad:?}: {text}");
        assert_eq!(fs::read_to_string(&list).expect("list"), written, "{bad:?}");
    }

    // A list that does not parse is left alone, and the command says so (exit 1).
    let broken = t.path("broken.list");
    fs::write(&broken, "revoke everything\n").expect("write");
    let (code, text) = run(&["revoke", &broken, "--key", &fp]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("line 1"), "{text}");
    assert_eq!(
        fs::read_to_string(&broken).expect("list"),
        "revoke everything\n"
    );

    // Certificates from stdin.
    let pem = fs::read_to_string(t.path("nodes/a.cert")).expect("cert");
    let (code, text) = run_stdin(&["cert", "show", "-"], Some(&pem));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&fp));
}

/// Rewrites a node's sys.config with `edit`.
fn edit_config(path: &str, edit: impl FnOnce(String) -> String) {
    let text = fs::read_to_string(path).expect("config");
    fs::write(path, edit(text)).expect("write");
}

fn add_entry(path: &str, entry: &str) {
    edit_config(path, |t| {
        t.replace(
            "{listen, #{port => 0}}",
            &format!("{{listen, #{{port => 0}}}},\n  {entry}"),
        )
    });
}

fn check(config: &str, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["check", config];
    args.extend_from_slice(extra);
    run(&args)
}

fn assert_fails(config: &str, extra: &[&str], needle: &str) {
    let (code, out) = check(config, extra);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(needle)),
        "expected a FAIL line with {needle:?}:\n{out}"
    );
}

#[test]
fn check_passes_a_good_config_and_catches_each_mistake() {
    let t = Tmp::new("check");
    cluster(&t);
    let b = t.path("c/b/sys.config");
    let (code, out) = check(&b, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("covers node name b@127.0.0.1"), "{out}");
    assert!(!out.contains("FAIL"));
    let fresh = fs::read_to_string(&b).expect("config");
    let reset = || fs::write(&b, &fresh).expect("reset");

    // Usage errors: exit 2.
    assert_eq!(check(&t.path("nope/sys.config"), &[]).0, 2);
    assert_eq!(run(&["check"]).0, 2);

    // Syntax.
    edit_config(&b, |t| t.replace("]}].", "]}]"));
    assert_fails(&b, &[], "does not end with '.'");
    reset();

    // A missing file.
    edit_config(&b, |t| t.replace("b.cert", "missing.cert"));
    assert_fails(&b, &[], "does not exist");
    reset();

    // A world-readable key.
    let key = t.path("c/b/b.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_fails(&b, &[], &format!("chmod 600 {key}"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");

    // A certificate for another node: by --node, and by the vm.args name.
    assert_fails(
        &b,
        &["--node", "x@127.0.0.1"],
        "is for node \"b@127.0.0.1\"",
    );
    let args = t.path("c/b/vm.args");
    let vm_args = fs::read_to_string(&args).expect("vm.args");
    fs::write(&args, vm_args.replace("-name b@", "-name other@")).expect("write");
    assert_fails(&b, &[], "but this node is \"other@127.0.0.1\"");
    fs::write(&args, &vm_args).expect("write");

    // Another node's certificate: it is not for this key.
    edit_config(&b, |t| t.replace("/b/b.cert", "/a/a.cert"));
    assert_fails(&b, &[], "they do not belong together");
    reset();

    // A certificate from an authority the node does not list.
    let other = t.path("other-auth");
    assert_eq!(run(&["authority", "new", &other]).0, 0);
    edit_config(&b, |t| {
        t.replace(
            &t_path(&t, "authority/authority.pub"),
            &format!("{other}/authority.pub"),
        )
    });
    assert_fails(&b, &[], "not among the configured authorities");
    reset();

    // An expired certificate (with its own key).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let (code, out) = run(&[
        "node",
        "new",
        "b@127.0.0.1",
        "--tier",
        "worker",
        "--authority",
        &t.path("c/authority"),
        "--out",
        &t.path("expired"),
        "--not-before",
        &(now - 100).to_string(),
        "--not-after",
        &(now - 10).to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
    edit_config(&b, |c| {
        c.replace(&t_path(&c, "b/b.cert"), &t.path("expired/b.cert"))
            .replace(&t_path(&c, "b/b.key"), &t.path("expired/b.key"))
    });
    assert_fails(&b, &[], "expired");
    reset();

    // An unknown key.
    add_entry(&b, "{listne, #{port => 4370}}");
    assert_fails(&b, &[], "unknown key listne");
    reset();

    // Bad policy values.
    for (policy, needle) in [
        (
            "{policy, #{edge => #{max_message_size => -1}}}",
            "max_message_size must be a positive integer",
        ),
        (
            "{policy, #{edge => #{funs => yes}}}",
            "funs must be true or false",
        ),
        (
            "{policy, #{edge => #{registered => [rex]}}}",
            "OTP system process",
        ),
        ("{policy, #{ghost => #{}}}", "not in tiers"),
        (
            "{policy, #{edge => #{rpc => [{m, f}]}}}",
            "rpc must be a list",
        ),
        (
            "{policy, #{edge => #{colour => red}}}",
            "unknown option colour",
        ),
    ] {
        add_entry(&b, policy);
        assert_fails(&b, &[], needle);
        reset();
    }

    // Assertions: a failing one, and one that holds.
    add_entry(
        &b,
        "{policy, #{edge => #{registered => [results]}}},\n  \
         {assertions, [{edge, may, {send, results}}, {edge, may, spawn}]}",
    );
    let (code, out) = check(&b, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("ok   assertions: {edge,may,{send,results}} holds"),
        "{out}"
    );
    assert!(
        out.contains("FAIL assertions: assertion {edge, may, spawn} does not hold"),
        "{out}"
    );
    reset();

    // A revocation list that revokes this node, and one that does not parse.
    let list = t.path("revoked.list");
    add_entry(&b, &format!("{{revoked, \"{list}\"}}"));
    let own = cert(&t.path("c/b/b.cert")).body().public_key.fingerprint();
    assert_eq!(run(&["revoke", &list, "--key", &own]).0, 0);
    assert_fails(&b, &[], "this node's own key");
    fs::write(&list, "key nonsense\n").expect("write");
    assert_fails(&b, &[], "line 1");
    fs::write(&list, "").expect("write");
    let (code, out) = check(&b, &[]);
    assert_eq!(code, 0, "{out}");
    reset();

    // A tier list without this node's tier.
    edit_config(&b, |t| {
        t.replace("{tiers, [admin, worker, edge]}", "{tiers, [admin, edge]}")
    });
    assert_fails(&b, &[], "tier \"worker\" is not in tiers");
    reset();
}

/// The absolute path of `rest` as the deployment wrote it into a config.
fn t_path(config: &str, rest: &str) -> String {
    let needle = format!("/{rest}\"");
    let end = config.find(&needle).expect("path in config") + needle.len() - 1;
    let start = config[..end].rfind('"').expect("quote") + 1;
    config[start..end].to_owned()
}

#[test]
fn policy_explain_answers_with_the_engine() {
    let t = Tmp::new("explain");
    cluster(&t);
    let a = t.path("c/a/sys.config");
    add_entry(
        &a,
        "{policy, #{worker => #{registered => [results], rpc => [{my_app, report, 1}],\n\
         max_message_size => 1024, funs => true, max_monitors => 5},\n\
         edge => #{audit => true, connect => true}}}",
    );

    let (code, out) = run(&["policy", "explain", &a, "--peer-tier", "worker"]);
    assert_eq!(code, 0, "{out}");
    for needle in [
        "tier worker -> this node (tier admin; tiers admin > worker > edge): RESTRICTED",
        "audit: off",
        "results: send allowed, monitor allowed",
        "any other name: send refused, monitor refused",
        "my_app:report/1: allowed",
        "anything else (os:cmd/1",
        "up to 1024 bytes per packet (1024 bytes allowed, 1025 bytes refused)",
        "funs in messages: allowed",
        "connect: refused",
        "monitors it may hold here at once: 5",
        "exit/2 to this node's processes: refused",
        "links to this node's processes: refused",
        "group leader changes: refused",
        "send refused; monitor refused except net_kernel",
    ] {
        assert!(out.contains(needle), "{needle:?} in:\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.contains("anything else") && l.contains(": refused")),
        "{out}"
    );

    let (code, out) = run(&["policy", "explain", &a, "--peer-tier", "edge"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("AUDIT MODE"), "{out}");
    assert!(out.contains("connect: allowed"), "{out}");
    assert!(out.contains("funs in messages: refused"), "{out}");

    // A full link: the same or a higher tier.
    let (code, out) = run(&["policy", "explain", &a, "--peer-tier", "admin"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("FULL"), "{out}");
    let (code, out) = run(&[
        "policy",
        "explain",
        &t.path("c/e/sys.config"),
        "--peer-tier",
        "worker",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("FULL") && out.contains("above"), "{out}");
    let (code, out) = run(&[
        "policy",
        "explain",
        &a,
        "--peer-tier",
        "worker",
        "--tier",
        "edge",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("FULL"), "{out}");

    // Usage: a tier that is not configured; a broken policy is exit 1.
    assert_eq!(run(&["policy", "explain", &a, "--peer-tier", "ghost"]).0, 2);
    add_entry(&a, "{policy, #{worker => #{funs => maybe}}}");
    let (code, out) = run(&["policy", "explain", &a, "--peer-tier", "worker"]);
    assert_eq!(code, 1, "{out}");
}
