//! `trust-dist`: keys, certificates and local deployments for trust_dist.
//!
//! Exit codes: 0 success, 1 the thing checked is not valid (for `cert verify`), 2 usage or
//! I/O error.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use rand_core::RngCore;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use trust_dist_proto::cert::{is_valid_node_pattern, is_valid_tier};
use trust_dist_proto::{Certificate, CertificateBody, KeyId, PublicKey, SecretKey};

#[derive(Parser)]
#[command(
    name = "trust-dist",
    version,
    about = "Keys, certificates and local deployments for trust_dist"
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
    /// Write a whole local deployment: authority, keys, certificates, sys.config and
    /// vm.args for each NAME@HOST:TIER.
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
enum AuthorityCommand {
    /// Create DIR/authority.key (mode 0600) and DIR/authority.pub.
    New {
        dir: PathBuf,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Create OUT/NAME.key (mode 0600) and OUT/NAME.cert signed by the authority in DIR.
    New {
        /// Node name (`name@host`) or pattern (`worker-*@10.0.*`).
        node: String,
        #[arg(long)]
        tier: String,
        /// Directory holding authority.key.
        #[arg(long)]
        authority: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
        /// Start of validity, Unix seconds (default: one minute ago, for clock skew).
        #[arg(long)]
        not_before: Option<u64>,
        /// End of validity, Unix seconds (overrides --valid-days).
        #[arg(long)]
        not_after: Option<u64>,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Print a certificate in human-readable form.
    Show { file: PathBuf },
    /// Exit 0 only if the certificate is signed by the authority in DIR and valid now.
    Verify {
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
    let cert =
        Certificate::from_pem(&read(file)?).map_err(|e| format!("{}: {e}", file.display()))?;
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
    let cert =
        Certificate::from_pem(&read(file)?).map_err(|e| format!("{}: {e}", file.display()))?;
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
