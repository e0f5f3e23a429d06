//! `trust-dist`: keys, certificates, revocation, configuration checks and local
//! deployments for trust_dist.
//!
//! Exit codes: 0 success, 1 the thing checked is not valid (`cert verify`, `check`,
//! `policy explain` of a broken config, `revoke` on a list that does not parse), 2 usage
//! or I/O error.
#![forbid(unsafe_code)]

mod check;
mod explain;
mod sysconfig;

use clap::{ArgGroup, Parser, Subcommand};
use rand_core::RngCore;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use trust_dist_proto::cert::{is_valid_node_pattern, is_valid_tier};
use trust_dist_proto::{Certificate, CertificateBody, KeyId, PublicKey, Revocations, SecretKey};

const EXIT_CODES: &str = "Exit codes: 0 success; 2 usage or I/O error (nothing written).";
const EXIT_CODES_CHECKED: &str =
    "Exit codes: 0 valid; 1 not valid (the reason is printed); 2 usage or I/O error.";

#[derive(Parser)]
#[command(
    name = "trust-dist",
    version,
    about = "Keys, certificates, revocation and configuration checks for trust_dist",
    after_help = "Exit codes: 0 success; 1 the thing checked is not valid (cert verify, check, \
                  policy explain, revoke on a broken list); 2 usage or I/O error.\n\
                  Private keys are written with mode 0600; existing files are never replaced \
                  without --force. FILE arguments of certificates may be - for stdin."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage certificate authorities.
    Authority {
        #[command(subcommand)]
        command: AuthorityCommand,
    },
    /// Manage node keys and certificates.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Inspect certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Append a key or certificate to a revocation list (created if missing).
    ///
    /// Nodes watching the list drop a connected peer it revokes within a second.
    #[command(
        group(ArgGroup::new("what").required(true).args(["key", "cert", "serial"])),
        after_help = "Exit codes: 0 revoked (or already revoked; the list is unchanged then); \
                      1 the existing list does not parse (nothing written); 2 usage or I/O \
                      error.\n\
                      Example: trust-dist revoke keys/revoked.list --cert old/web-1.cert \
                      --comment \"web-1 disk lost\""
    )]
    Revoke {
        /// The revocation list file (the `revoked` key of sys.config).
        list: PathBuf,
        /// Revoke every certificate of this key: its fingerprint as `cert show` prints it.
        #[arg(long, value_name = "SHA256:...")]
        key: Option<String>,
        /// Revoke this one certificate (by issuer and serial); - reads stdin.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// Revoke one certificate by issuer key id (16 hex digits) and serial.
        #[arg(long, num_args = 2, value_names = ["ISSUER", "SERIAL"])]
        serial: Option<Vec<String>>,
        /// A comment stored on the line (why, when, who).
        #[arg(long)]
        comment: Option<String>,
    },
    /// Check a node's sys.config offline, as the node will at boot: one line per check.
    ///
    /// Relative paths in the config are taken from the current directory, as the node
    /// takes them from its own. The node name comes from --node, or from -name in a
    /// vm.args next to CONFIG.
    #[command(
        after_help = "Exit codes: 0 every check passed; 1 a check failed (each FAIL \
                            line says how to fix it); 2 usage error or CONFIG unreadable."
    )]
    Check {
        /// The node's sys.config.
        config: PathBuf,
        /// The node's name, to check the certificate covers it.
        #[arg(long, value_name = "NAME@HOST")]
        node: Option<String>,
    },
    /// Explain a node's policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Write a whole local deployment: authority, keys, certificates, sys.config and
    /// vm.args for each NAME@HOST:TIER.
    #[command(after_help = EXIT_CODES)]
    DevCluster {
        dir: PathBuf,
        /// NAME@HOST:TIER, one per node.
        #[arg(required = true)]
        nodes: Vec<String>,
        /// Tier order, highest first (default: the order in which tiers first appear).
        #[arg(long, value_delimiter = ',')]
        tiers: Option<Vec<String>>,
        /// The `ebin` directory of the built trust_dist application, for `-pa`.
        #[arg(long)]
        ebin: Option<PathBuf>,
        /// Overwrite an existing deployment in DIR.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// What a peer of tier T may do to the node of CONFIG, as its filter decides it.
    #[command(
        after_help = "Exit codes: 0 explained; 1 CONFIG's tiers or policy are not \
                            valid (run trust-dist check); 2 usage error, CONFIG unreadable \
                            or T not a configured tier."
    )]
    Explain {
        /// The node's sys.config.
        config: PathBuf,
        /// The tier of the peer.
        #[arg(long, value_name = "T")]
        peer_tier: String,
        /// This node's tier (default: the tier of its certificate).
        #[arg(long, value_name = "TIER")]
        tier: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuthorityCommand {
    /// Create DIR/authority.key (mode 0600) and DIR/authority.pub.
    #[command(after_help = EXIT_CODES)]
    New {
        dir: PathBuf,
        /// Overwrite an existing authority in DIR.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Create OUT/NAME.key (mode 0600) and OUT/NAME.cert signed by the authority in DIR.
    #[command(after_help = EXIT_CODES)]
    New {
        /// Node name (`name@host`) or pattern (`worker-*@10.0.*`).
        node: String,
        /// The node's tier (lowercase letters, digits and _).
        #[arg(long)]
        tier: String,
        /// Directory holding authority.key.
        #[arg(long)]
        authority: PathBuf,
        /// Directory to write NAME.key and NAME.cert into.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
        /// Start of validity, Unix seconds (default: one minute ago, for clock skew).
        #[arg(long)]
        not_before: Option<u64>,
        /// End of validity, Unix seconds (overrides --valid-days).
        #[arg(long)]
        not_after: Option<u64>,
        /// Overwrite an existing NAME.key and NAME.cert.
        #[arg(long)]
        force: bool,
    },
    /// Give a node a new key: same name and tier as OUT/NAME.cert, new serial.
    ///
    /// The old key and certificate are kept as OUT/NAME.key.old (mode 0600) and
    /// OUT/NAME.cert.old; the old fingerprint is printed, ready for `trust-dist revoke`.
    #[command(
        after_help = "Exit codes: 0 rotated; 2 usage or I/O error (nothing changed, \
                            e.g. no OUT/NAME.cert, or .old files exist without --force)."
    )]
    Rotate {
        /// The node name (or pattern) of the certificate to rotate.
        node: String,
        /// Directory holding authority.key.
        #[arg(long)]
        authority: PathBuf,
        /// Directory holding NAME.key and NAME.cert.
        #[arg(long)]
        out: PathBuf,
        /// Days the new certificate is valid.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
        /// Replace NAME.key.old and NAME.cert.old left by an earlier rotation.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Print a certificate in human-readable form (FILE may be - for stdin).
    #[command(after_help = EXIT_CODES)]
    Show { file: PathBuf },
    /// Exit 0 only if the certificate is signed by the authority in DIR and valid now.
    #[command(after_help = EXIT_CODES_CHECKED)]
    Verify {
        /// The certificate; - reads stdin.
        file: PathBuf,
        /// Directory holding authority.pub, or the .pub file itself.
        #[arg(long)]
        authority: PathBuf,
    },
}

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Authority {
            command: AuthorityCommand::New { dir, force },
        } => authority_new(&dir, force),
        Command::Node {
            command:
                NodeCommand::New {
                    node,
                    tier,
                    authority,
                    out,
                    valid_days,
                    not_before,
                    not_after,
                    force,
                },
        } => node_new(
            &node, &tier, &authority, &out, valid_days, not_before, not_after, force,
        )
        .map(|_| ()),
        Command::Cert {
            command: CertCommand::Show { file },
        } => cert_show(&file),
        Command::Cert {
            command: CertCommand::Verify { file, authority },
        } => match cert_verify(&file, &authority) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Node {
            command:
                NodeCommand::Rotate {
                    node,
                    authority,
                    out,
                    valid_days,
                    force,
                },
        } => node_rotate(&node, &authority, &out, valid_days, force),
        Command::Revoke {
            list,
            key,
            cert,
            serial,
            comment,
        } => match revoke(&list, key, cert, serial, comment.as_deref()) {
            Err(Failure::Invalid(message)) => {
                eprintln!("trust-dist: {message}");
                return ExitCode::from(1);
            }
            Err(Failure::Usage(message)) => Err(message),
            Ok(()) => Ok(()),
        },
        Command::Check { config, node } => match check::check(&config, node.as_deref(), now()) {
            Ok(report) => {
                report.print();
                return if report.failed() {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                };
            }
            Err(e) => Err(e),
        },
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    config,
                    peer_tier,
                    tier,
                },
        } => match policy_explain(&config, &peer_tier, tier.as_deref()) {
            Err(Failure::Invalid(message)) => {
                eprintln!("trust-dist: {message}");
                return ExitCode::from(1);
            }
            Err(Failure::Usage(message)) => Err(message),
            Ok(()) => Ok(()),
        },
        Command::DevCluster {
            dir,
            nodes,
            tiers,
            ebin,
            force,
        } => dev_cluster(&dir, &nodes, tiers, ebin, force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("trust-dist: {message}");
            ExitCode::from(2)
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `contents` to `path`, refusing to replace an existing file unless `force`.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<()> {
    if path.exists() && !force {
        return Err(format!(
            "{} exists; use --force to overwrite",
            path.display()
        ));
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    // Created with the final mode, so a private key is never readable by others, even
    // briefly.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A file's text, or standard input for `-`.
fn read_input(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        return Ok(text);
    }
    read(path)
}

fn read_certificate(path: &Path) -> Result<Certificate> {
    Certificate::from_pem(&read_input(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(crate) fn days_left(until: u64, now: u64) -> String {
    if until <= now {
        "expired".into()
    } else {
        format!("{} days left", (until - now) / 86_400)
    }
}

/// Why a command that judges something did not succeed.
enum Failure {
    /// The thing judged is not valid: exit 1.
    Invalid(String),
    /// Usage or I/O: exit 2.
    Usage(String),
}

fn authority_new(dir: &Path, force: bool) -> Result<()> {
    let key = SecretKey::generate();
    write_file(
        &dir.join("authority.key"),
        &key.to_pkcs8_pem(),
        0o600,
        force,
    )?;
    write_file(
        &dir.join("authority.pub"),
        &key.public().to_spki_pem(),
        0o644,
        force,
    )?;
    println!(
        "authority {} (key id {})",
        key.public().fingerprint(),
        key.public().key_id()
    );
    println!("  private key: {}", dir.join("authority.key").display());
    println!("  public key:  {}", dir.join("authority.pub").display());
    Ok(())
}

fn file_stem(node: &str) -> Result<String> {
    let name = node.split('@').next().unwrap_or_default().replace('*', "_");
    if name.is_empty() {
        return Err(format!("{node:?} has no name part before '@'"));
    }
    Ok(name)
}

#[allow(clippy::too_many_arguments)]
fn node_new(
    node: &str,
    tier: &str,
    authority_dir: &Path,
    out: &Path,
    valid_days: u64,
    not_before: Option<u64>,
    not_after: Option<u64>,
    force: bool,
) -> Result<PathBuf> {
    if !is_valid_node_pattern(node) {
        return Err(format!(
            "{node:?} is not a node name (name@host) or pattern"
        ));
    }
    if !is_valid_tier(tier) {
        return Err(format!(
            "{tier:?} is not a tier name: use lowercase letters, digits and _"
        ));
    }
    let authority_path = authority_dir.join("authority.key");
    let authority = SecretKey::from_pkcs8_pem(&read(&authority_path)?)
        .map_err(|e| format!("{}: {e}", authority_path.display()))?;
    let key = SecretKey::generate();
    let not_before = not_before.unwrap_or_else(|| now().saturating_sub(60));
    let not_after =
        not_after.unwrap_or_else(|| not_before + 60 + valid_days.saturating_mul(86_400));
    let body = CertificateBody {
        serial: rand_core::OsRng.next_u64(),
        node: node.to_owned(),
        public_key: key.public(),
        tier: tier.to_owned(),
        not_before,
        not_after,
        issuer: KeyId([0; 8]),
    };
    let cert = Certificate::issue(body, &authority).map_err(|e| e.to_string())?;
    let stem = file_stem(node)?;
    let key_path = out.join(format!("{stem}.key"));
    let cert_path = out.join(format!("{stem}.cert"));
    if !force {
        for p in [&key_path, &cert_path] {
            if p.exists() {
                return Err(format!("{} exists; use --force to overwrite", p.display()));
            }
        }
    }
    write_file(&key_path, &key.to_pkcs8_pem(), 0o600, force)?;
    write_file(&cert_path, &cert.to_pem(), 0o644, force)?;
    println!("node {node} tier {tier} key {}", key.public().fingerprint());
    println!("  private key: {}", key_path.display());
    println!("  certificate: {}", cert_path.display());
    Ok(cert_path)
}

fn cert_show(file: &Path) -> Result<()> {
    let cert = read_certificate(file)?;
    println!("{}", cert.body());
    Ok(())
}

fn load_authority(path: &Path) -> Result<PublicKey> {
    let file = if path.is_dir() {
        path.join("authority.pub")
    } else {
        path.to_owned()
    };
    PublicKey::from_spki_pem(&read(&file)?).map_err(|e| format!("{}: {e}", file.display()))
}

fn cert_verify(file: &Path, authority: &Path) -> Result<bool> {
    let cert = read_certificate(file)?;
    let authority = load_authority(authority)?;
    match cert.verify(&[authority], now()) {
        Ok(body) => {
            println!(
                "{}: valid ({} tier {}, until {})",
                file.display(),
                body.node,
                body.tier,
                body.not_after
            );
            Ok(true)
        }
        Err(e) => {
            println!("{}: NOT valid: {e}", file.display());
            Ok(false)
        }
    }
}

struct NodeSpec {
    name: String,
    host: String,
    tier: String,
}

fn parse_node_spec(spec: &str) -> Result<NodeSpec> {
    let (node, tier) = spec
        .rsplit_once(':')
        .ok_or_else(|| format!("{spec:?} is not NAME@HOST:TIER"))?;
    let (name, host) = node
        .split_once('@')
        .ok_or_else(|| format!("{spec:?} is not NAME@HOST:TIER"))?;
    if name.is_empty() || host.is_empty() || !is_valid_node_pattern(node) || node.contains('*') {
        return Err(format!("{node:?} is not a node name"));
    }
    if !is_valid_tier(tier) {
        return Err(format!("{tier:?} is not a tier name"));
    }
    Ok(NodeSpec {
        name: name.into(),
        host: host.into(),
        tier: tier.into(),
    })
}

/// The `ebin` of the built application: `--ebin`, or the newest build next to this
/// executable's checkout.
fn find_ebin(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return fs::canonicalize(&dir).map_err(|e| format!("--ebin {}: {e}", dir.display()));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut candidates = Vec::new();
    for root in exe.ancestors().skip(1) {
        for env in ["dev", "test", "prod", "default"] {
            candidates.push(root.join("_build").join(env).join("lib/trust_dist/ebin"));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.join("trust_dist.beam").exists())
        .ok_or_else(|| {
            "cannot find the built trust_dist ebin; run `make build` or pass --ebin".into()
        })
}

fn erl_string(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn dev_cluster(
    dir: &Path,
    specs: &[String],
    tiers: Option<Vec<String>>,
    ebin: Option<PathBuf>,
    force: bool,
) -> Result<()> {
    let nodes = specs
        .iter()
        .map(|s| parse_node_spec(s))
        .collect::<Result<Vec<_>>>()?;
    let tiers = match tiers {
        Some(t) => t,
        None => {
            let mut t: Vec<String> = Vec::new();
            for n in &nodes {
                if !t.contains(&n.tier) {
                    t.push(n.tier.clone());
                }
            }
            t
        }
    };
    for n in &nodes {
        if !tiers.contains(&n.tier) {
            return Err(format!(
                "tier {:?} of {}@{} is not in --tiers",
                n.tier, n.name, n.host
            ));
        }
    }
    let ebin = find_ebin(ebin)?;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir = fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let authority_dir = dir.join("authority");
    authority_new(&authority_dir, force)?;
    let mut cookie = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut cookie);
    let cookie: String = cookie.iter().map(|b| format!("{b:02x}")).collect();
    let tier_list = tiers.join(", ");
    for n in &nodes {
        let node_dir = dir.join(&n.name);
        let node = format!("{}@{}", n.name, n.host);
        node_new(
            &node,
            &n.tier,
            &authority_dir,
            &node_dir,
            365,
            None,
            None,
            force,
        )?;
        let sys_config = format!(
            "%% Written by `trust-dist dev-cluster` for {node} (tier {tier}).\n\
             [{{trust_dist, [\n  \
               {{identity, {key}}},\n  \
               {{certificate, {cert}}},\n  \
               {{authorities, [{auth}]}},\n  \
               {{tiers, [{tier_list}]}},\n  \
               {{listen, #{{port => 0}}}}\n\
             ]}}].\n",
            tier = n.tier,
            key = erl_string(&node_dir.join(format!("{}.key", n.name))),
            cert = erl_string(&node_dir.join(format!("{}.cert", n.name))),
            auth = erl_string(&authority_dir.join("authority.pub")),
        );
        write_file(&node_dir.join("sys.config"), &sys_config, 0o644, force)?;
        let name_flag = if n.host.contains('.') || n.host.contains(':') {
            "-name"
        } else {
            "-sname"
        };
        let vm_args = format!(
            "## Written by `trust-dist dev-cluster`: erl -args_file {args}\n\
             {name_flag} {node}\n\
             -proto_dist trust\n\
             -setcookie {cookie}\n\
             -pa {ebin}\n\
             -config {config}\n",
            args = node_dir.join("vm.args").display(),
            ebin = ebin.display(),
            config = node_dir.join("sys.config").display(),
        );
        write_file(&node_dir.join("vm.args"), &vm_args, 0o644, force)?;
        println!(
            "  start with:  erl -args_file {}",
            node_dir.join("vm.args").display()
        );
    }
    Ok(())
}

/// Renames `from` to `to`, replacing `to`.
fn keep_old(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to)
        .map_err(|e| format!("cannot move {} to {}: {e}", from.display(), to.display()))
}

fn node_rotate(
    node: &str,
    authority_dir: &Path,
    out: &Path,
    valid_days: u64,
    force: bool,
) -> Result<()> {
    let stem = file_stem(node)?;
    let key_path = out.join(format!("{stem}.key"));
    let cert_path = out.join(format!("{stem}.cert"));
    let key_old = out.join(format!("{stem}.key.old"));
    let cert_old = out.join(format!("{stem}.cert.old"));
    if !cert_path.exists() {
        return Err(format!(
            "{} does not exist: nothing to rotate (create the node with `trust-dist node new`)",
            cert_path.display()
        ));
    }
    let old = read_certificate(&cert_path)?;
    let old = old.body().clone();
    if old.node != node {
        return Err(format!(
            "{} is the certificate of {:?}, not {node:?}",
            cert_path.display(),
            old.node
        ));
    }
    let old_key = if key_path.exists() {
        Some(
            SecretKey::from_pkcs8_pem(&read(&key_path)?)
                .map_err(|e| format!("{}: {e}", key_path.display()))?,
        )
    } else {
        None
    };
    if !force {
        for p in [&key_old, &cert_old] {
            if p.exists() {
                return Err(format!(
                    "{} exists (from an earlier rotation); use --force to replace it",
                    p.display()
                ));
            }
        }
    }
    let authority_path = authority_dir.join("authority.key");
    let authority = SecretKey::from_pkcs8_pem(&read(&authority_path)?)
        .map_err(|e| format!("{}: {e}", authority_path.display()))?;
    let key = SecretKey::generate();
    let not_before = now().saturating_sub(60);
    let mut serial = rand_core::OsRng.next_u64();
    while serial == old.serial {
        serial = rand_core::OsRng.next_u64();
    }
    let body = CertificateBody {
        serial,
        node: old.node.clone(),
        public_key: key.public(),
        tier: old.tier.clone(),
        not_before,
        not_after: not_before + 60 + valid_days.saturating_mul(86_400),
        issuer: KeyId([0; 8]),
    };
    let cert = Certificate::issue(body, &authority).map_err(|e| e.to_string())?;

    // Keep the old pair, then write the new one; on a failure put the old pair back.
    keep_old(&cert_path, &cert_old)?;
    if old_key.is_some() {
        if let Err(e) = keep_old(&key_path, &key_old).and_then(|()| {
            fs::set_permissions(&key_old, fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot chmod {}: {e}", key_old.display()))
        }) {
            let _ = fs::rename(&cert_old, &cert_path);
            return Err(e);
        }
    }
    let written = write_file(&key_path, &key.to_pkcs8_pem(), 0o600, true)
        .and_then(|()| write_file(&cert_path, &cert.to_pem(), 0o644, true));
    if let Err(e) = written {
        let _ = fs::rename(&cert_old, &cert_path);
        if old_key.is_some() {
            let _ = fs::rename(&key_old, &key_path);
        }
        return Err(format!(
            "{e}; the old key and certificate are back in place"
        ));
    }
    let old_fp = old.public_key.fingerprint();
    println!("node {} tier {} rotated", old.node, old.tier);
    println!(
        "  old key: {old_fp} (serial {}), kept in {}{}",
        old.serial,
        cert_old.display(),
        if old_key.is_some() {
            format!(" and {}", key_old.display())
        } else {
            " (there was no old key file)".into()
        }
    );
    println!(
        "  new key: {} (serial {serial}, valid until {})",
        key.public().fingerprint(),
        utc(cert.body().not_after)
    );
    if let Some(k) = &old_key {
        if k.public() != old.public_key {
            println!(
                "  note: the old key file held {}, not the certificate's key",
                k.public().fingerprint()
            );
        }
    }
    if cert.body().issuer != old.issuer {
        println!(
            "  note: issued by authority {}, the old certificate by {}",
            cert.body().issuer,
            old.issuer
        );
    }
    println!("  once the node runs the new key: trust-dist revoke LIST --key {old_fp}");
    Ok(())
}

fn is_fingerprint(text: &str) -> bool {
    text.strip_prefix("SHA256:").is_some_and(|b64| {
        b64.len() == 16
            && b64
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
    })
}

fn revoke(
    list: &Path,
    key: Option<String>,
    cert: Option<PathBuf>,
    serial: Option<Vec<String>>,
    comment: Option<&str>,
) -> std::result::Result<(), Failure> {
    let usage = Failure::Usage;
    let (entry, what, default_comment) = match (key, cert, serial) {
        (Some(fp), None, None) => {
            if !is_fingerprint(&fp) {
                return Err(usage(format!(
                    "{fp:?} is not a key fingerprint: SHA256: and 16 base64 characters, as \
                     `trust-dist cert show` prints it"
                )));
            }
            (format!("key {fp}"), format!("key {fp}"), None)
        }
        (None, Some(file), None) => {
            let c = read_certificate(&file).map_err(usage)?;
            let b = c.body();
            (
                format!("serial {} {}", b.issuer, b.serial),
                format!(
                    "certificate serial {} of issuer {} ({} tier {})",
                    b.serial, b.issuer, b.node, b.tier
                ),
                Some(format!(
                    "{} tier {} key {}",
                    b.node,
                    b.tier,
                    b.public_key.fingerprint()
                )),
            )
        }
        (None, None, Some(parts)) => {
            let [issuer, number] = parts.as_slice() else {
                return Err(usage("--serial takes ISSUER SERIAL".into()));
            };
            if issuer.len() != 16 || !issuer.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(usage(format!(
                    "{issuer:?} is not an issuer key id (16 hex digits, as `cert show` prints it)"
                )));
            }
            let number: u64 = number
                .parse()
                .map_err(|_| usage(format!("{number:?} is not a serial number")))?;
            let issuer = issuer.to_ascii_lowercase();
            (
                format!("serial {issuer} {number}"),
                format!("certificate serial {number} of issuer {issuer}"),
                None,
            )
        }
        _ => {
            return Err(usage(
                "give exactly one of --key, --cert and --serial".into(),
            ))
        }
    };
    let comment = comment.map(str::to_owned).or(default_comment);
    if let Some(c) = &comment {
        if c.chars().any(char::is_control) || c.len() > 512 {
            return Err(usage(
                "--comment must be one line of at most 512 bytes".into(),
            ));
        }
    }
    let line = match &comment {
        Some(c) if !c.trim().is_empty() => format!("{entry}  # {}\n", c.trim()),
        _ => format!("{entry}\n"),
    };

    let (existing, mode) = match fs::read_to_string(list) {
        Ok(text) => {
            let mode = fs::metadata(list)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0o644);
            (text, mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o644),
        Err(e) => return Err(usage(format!("cannot read {}: {e}", list.display()))),
    };
    let before = Revocations::parse(&existing).map_err(|e| {
        Failure::Invalid(format!(
            "{}: {e}; the list does not parse, so nodes keep their previous one. Fix it \
             first (nothing was written)",
            list.display()
        ))
    })?;
    let mut text = existing.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&line);
    let after = Revocations::parse(&text).map_err(|e| {
        Failure::Invalid(format!(
            "the new entry would not parse ({e}); nothing written"
        ))
    })?;
    if after.len() == before.len() {
        println!(
            "{what} is already revoked in {} ({} entries); unchanged",
            list.display(),
            before.len()
        );
        return Ok(());
    }
    // A new file renamed over the old one: a node reading the list while it changes sees
    // the old list or the new one, never half a line.
    let name = list
        .file_name()
        .ok_or_else(|| usage(format!("{} is not a file name", list.display())))?;
    let dir = match list.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| usage(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, list)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(usage(format!("cannot write {}: {e}", list.display())));
    }
    println!(
        "revoked {what} in {} ({} entries)",
        list.display(),
        after.len()
    );
    Ok(())
}

/// Reads CONFIG with the checker and explains the policy for `peer`.
fn policy_explain(
    config: &Path,
    peer: &str,
    local: Option<&str>,
) -> std::result::Result<(), Failure> {
    let report = check::check(config, None, now()).map_err(Failure::Usage)?;
    let (Some(order), Some(policy)) = (&report.tiers, &report.policy) else {
        let problems: Vec<String> = report
            .lines
            .iter()
            .filter(|l| {
                l.status == check::Status::Fail
                    && matches!(
                        l.subject.as_str(),
                        "sys.config" | "keys" | "tiers" | "policy"
                    )
            })
            .map(|l| format!("{}: {}", l.subject, l.text))
            .collect();
        return Err(Failure::Invalid(format!(
            "{} has no valid tiers and policy to explain:\n  {}\n(run trust-dist check {})",
            config.display(),
            problems.join("\n  "),
            config.display()
        )));
    };
    let local = match (local, &report.certificate) {
        (Some(t), _) => t.to_owned(),
        (None, Some(body)) => body.tier.clone(),
        (None, None) => {
            return Err(Failure::Usage(format!(
                "cannot read this node's certificate to learn its tier; pass --tier TIER \
                 (run trust-dist check {} for why)",
                config.display()
            )))
        }
    };
    let lines = explain::explain(policy, order, &local, peer).map_err(Failure::Usage)?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
