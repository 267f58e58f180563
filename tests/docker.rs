//! The container packaging, checked without a Docker engine (none runs on CI):
//!
//! - `config/docker.toml` (the image's config) and `config/docker-redis.toml` pass `idemproxy check`;
//! - the `Dockerfile`'s ENTRYPOINT, CMD, ENV, EXPOSE, HEALTHCHECK, USER, VOLUME and COPY lines agree with that
//!   config and with the binary, and `.dockerignore` keeps every file the build needs;
//! - the image's ENTRYPOINT + CMD + ENV, run as the real binary (container paths mapped to the repo, addresses
//!   to loopback, data dir to a tempdir), start a proxy that forwards, records and replays through a real
//!   upstream, and the image's HEALTHCHECK command reports it healthy; SIGTERM (the STOPSIGNAL) exits 0;
//! - `idemproxy health` exits 0 against a live admin listener and 1, in bounded time, against a dead port, a
//!   silent one, a non-200 answer or an unusable URL;
//! - `docker/compose.yaml` and `docker/kubernetes.yaml` parse, every file they name exists, and their ports,
//!   probes, mounts, commands and grace periods match the Dockerfile and the configs.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{dead_addr, post_key, run_cli, CliOutput, Proxy, Upstream};
use idemproxy::config::{Backend, Config, Overrides};
use serde_yaml_ng::Value;

const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// A health probe against a dead or silent target must end well within this.
const PROBE_BOUND: Duration = Duration::from_secs(6);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn load_config(path: &Path) -> Config {
    Config::load(Some(path), &Overrides::default())
        .unwrap_or_else(|e| panic!("{} is not a valid config:\n{e}", path.display()))
}

fn check(path: &Path) -> CliOutput {
    run_cli(
        &["check", "--config", path.to_str().unwrap()],
        &[],
        CLI_TIMEOUT,
    )
}

fn health(args: &[&str], envs: &[(&str, &str)]) -> (CliOutput, Duration) {
    let started = Instant::now();
    let out = run_cli(args, envs, CLI_TIMEOUT);
    (out, started.elapsed())
}

// ---------------------------------------------------------------------------------------------------------
// Dockerfile: a small parser for the subset this repo uses (continuations, comments, exec-form JSON).

#[derive(Debug, Clone)]
struct Instr {
    keyword: String,
    args: String,
    line: usize,
}

impl Instr {
    /// The exec (JSON array) form of this instruction's arguments; panics on the shell form.
    fn exec(&self) -> Vec<String> {
        exec_form(&self.args).unwrap_or_else(|| {
            panic!(
                "line {}: {} must use the exec (JSON) form, got {:?}",
                self.line, self.keyword, self.args
            )
        })
    }

    /// Leading `--name=value` flags and the rest.
    fn flags(&self) -> (BTreeMap<String, String>, String) {
        let mut flags = BTreeMap::new();
        let mut rest = self.args.trim();
        while let Some(after) = rest.strip_prefix("--") {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            let (flag, tail) = after.split_at(end);
            let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
            flags.insert(k.to_string(), v.to_string());
            rest = tail.trim_start();
        }
        (flags, rest.to_string())
    }
}

fn exec_form(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    if !s.starts_with('[') {
        return None;
    }
    serde_json::from_str(s).ok()
}

#[derive(Debug)]
struct Dockerfile {
    /// `ARG NAME=default` lines before the first FROM (the base images).
    args: BTreeMap<String, String>,
    /// Stages in order; each starts with its FROM.
    stages: Vec<Vec<Instr>>,
}

/// A COPY instruction, split up.
#[derive(Debug)]
struct Copy {
    from: Option<String>,
    chown: Option<String>,
    sources: Vec<String>,
    dest: String,
}

impl Dockerfile {
    fn parse(text: &str) -> Dockerfile {
        let mut stages: Vec<Vec<Instr>> = Vec::new();
        let mut globals = BTreeMap::new();
        let mut cur = String::new();
        let mut start = 0;
        for (i, raw) in text.lines().enumerate() {
            let t = raw.trim();
            // Comment lines (also inside a continuation, as Docker drops them) and blank lines.
            if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
                continue;
            }
            if cur.is_empty() {
                start = i + 1;
            }
            if let Some(body) = t.strip_suffix('\\') {
                cur.push_str(body.trim_end());
                cur.push(' ');
                continue;
            }
            cur.push_str(t);
            let (kw, args) = cur
                .split_once(char::is_whitespace)
                .unwrap_or((cur.as_str(), ""));
            let instr = Instr {
                keyword: kw.to_ascii_uppercase(),
                args: args.trim().to_string(),
                line: start,
            };
            if instr.keyword == "FROM" {
                stages.push(Vec::new());
            }
            if instr.keyword == "ARG" && stages.is_empty() {
                let (name, default) = instr.args.split_once('=').unwrap_or((&instr.args, ""));
                globals.insert(name.trim().to_owned(), default.trim().to_owned());
                cur.clear();
                continue;
            }
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("line {start}: {kw} before any FROM"))
                .push(instr);
            cur.clear();
        }
        assert!(cur.is_empty(), "Dockerfile ends inside a line continuation");
        Dockerfile {
            args: globals,
            stages,
        }
    }

    fn load() -> Dockerfile {
        Dockerfile::parse(&read("Dockerfile"))
    }

    fn runtime(&self) -> &[Instr] {
        self.stages.last().expect("no FROM in the Dockerfile")
    }

    /// `FROM image AS name` of a stage: (image, name), with `${ARG}` replaced by its default.
    fn from(&self, stage: &[Instr]) -> (String, Option<String>) {
        let words: Vec<&str> = stage[0].args.split_whitespace().collect();
        let mut image = words
            .iter()
            .find(|w| !w.starts_with("--"))
            .unwrap()
            .to_string();
        for (name, default) in &self.args {
            image = image.replace(&format!("${{{name}}}"), default);
        }
        assert!(
            !image.contains('$'),
            "FROM {image}: an ARG without a default"
        );
        let name = words
            .iter()
            .position(|w| w.eq_ignore_ascii_case("as"))
            .map(|i| words[i + 1].to_string());
        (image, name)
    }

    /// The only `keyword` instruction of the runtime stage (several would be a mistake: the last wins).
    fn one(&self, keyword: &str) -> &Instr {
        let found: Vec<&Instr> = self
            .runtime()
            .iter()
            .filter(|i| i.keyword == keyword)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {keyword} in the runtime stage, found {found:?}"
        );
        found[0]
    }

    fn all<'a>(stage: &'a [Instr], keyword: &'a str) -> impl Iterator<Item = &'a Instr> + 'a {
        stage.iter().filter(move |i| i.keyword == keyword)
    }

    fn copies(stage: &[Instr]) -> Vec<Copy> {
        Self::all(stage, "COPY")
            .map(|i| {
                let (flags, rest) = i.flags();
                let mut parts = exec_form(&rest)
                    .unwrap_or_else(|| rest.split_whitespace().map(str::to_string).collect());
                let dest = parts
                    .pop()
                    .unwrap_or_else(|| panic!("line {}: COPY without a destination", i.line));
                assert!(!parts.is_empty(), "line {}: COPY without a source", i.line);
                Copy {
                    from: flags.get("from").cloned(),
                    chown: flags.get("chown").cloned(),
                    sources: parts,
                    dest,
                }
            })
            .collect()
    }

    /// The runtime stage's ENV, in order (later ones win).
    fn env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for i in Self::all(self.runtime(), "ENV") {
            let unquote = |s: &str| s.trim_matches('"').to_string();
            if i.args.contains('=') {
                for pair in i.args.split_whitespace() {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("line {}: ENV pair {pair:?} without =", i.line));
                    out.push((k.to_string(), unquote(v)));
                }
            } else {
                let (k, v) = i.args.split_once(char::is_whitespace).unwrap();
                out.push((k.to_string(), unquote(v.trim())));
            }
        }
        out
    }

    fn env_var(&self, name: &str) -> Option<String> {
        self.env()
            .into_iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    fn entrypoint(&self) -> Vec<String> {
        self.one("ENTRYPOINT").exec()
    }

    fn cmd(&self) -> Vec<String> {
        self.one("CMD").exec()
    }

    /// The config path the image runs with: the value after `--config` in CMD.
    fn config_path(&self) -> String {
        let cmd = self.cmd();
        let i = cmd
            .iter()
            .position(|a| a == "--config")
            .unwrap_or_else(|| panic!("CMD {cmd:?} names no --config"));
        cmd.get(i + 1).cloned().unwrap()
    }

    /// HEALTHCHECK options and its exec-form command.
    fn healthcheck(&self) -> (BTreeMap<String, String>, Vec<String>) {
        let hc = self.one("HEALTHCHECK");
        let (flags, rest) = hc.flags();
        let cmd = rest
            .strip_prefix("CMD")
            .unwrap_or_else(|| panic!("line {}: HEALTHCHECK without CMD: {:?}", hc.line, hc.args));
        (
            flags,
            exec_form(cmd).unwrap_or_else(|| {
                panic!("HEALTHCHECK CMD must be exec form (the image has no shell): {cmd:?}")
            }),
        )
    }

    fn exposed(&self) -> BTreeSet<u16> {
        Self::all(self.runtime(), "EXPOSE")
            .flat_map(|i| {
                i.args
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .map(|p| {
                p.trim_end_matches("/tcp")
                    .parse()
                    .unwrap_or_else(|_| panic!("EXPOSE {p:?} is not a TCP port"))
            })
            .collect()
    }

    fn volumes(&self) -> Vec<String> {
        Self::all(self.runtime(), "VOLUME")
            .flat_map(|i| {
                exec_form(&i.args)
                    .unwrap_or_else(|| i.args.split_whitespace().map(str::to_string).collect())
            })
            .collect()
    }

    /// USER as a numeric uid (Kubernetes' runAsNonRoot can only verify a number).
    fn uid(&self) -> u32 {
        let user = &self.one("USER").args;
        let uid = user.split(':').next().unwrap();
        uid.parse()
            .unwrap_or_else(|_| panic!("USER {user:?} must be numeric for runAsNonRoot"))
    }
}

/// The image's config (`config/docker.toml`), typed.
fn docker_config() -> Config {
    load_config(&repo().join("config/docker.toml"))
}

#[test]
fn docker_configs_pass_check() {
    for rel in ["config/docker.toml", "config/docker-redis.toml"] {
        let path = repo().join(rel);
        let out = check(&path);
        assert_eq!(
            out.code(),
            Some(0),
            "idemproxy check {rel}:\n{}",
            out.stderr
        );
        assert!(
            out.stdout.contains("ok"),
            "check {rel} printed {:?}",
            out.stdout
        );
    }
    // What a container needs from them: listeners on every interface, sled in the volume / Redis.
    let c = docker_config();
    assert!(
        c.server.listen.ip().is_unspecified(),
        "server.listen {}",
        c.server.listen
    );
    assert!(
        c.admin.listen.ip().is_unspecified(),
        "admin.listen {}",
        c.admin.listen
    );
    assert_eq!(c.store.backend, Backend::Sled);
    assert!(
        c.store.path.is_absolute(),
        "store.path {:?} must be the volume",
        c.store.path
    );
    assert!(
        c.admin.token.is_none(),
        "no token in a file baked into an image"
    );
    let r = load_config(&repo().join("config/docker-redis.toml"));
    assert_eq!(r.store.backend, Backend::Redis);
    assert!(
        r.admin.token.is_none(),
        "no token in a file baked into an image"
    );
}

#[test]
fn dockerfile_matches_the_config_and_the_binary() {
    let df = Dockerfile::load();
    let cfg = docker_config();
    assert!(df.stages.len() >= 2, "multi-stage build expected");

    // Build in the official Rust image with the lock file; run in a slim or distroless image.
    let build = &df.stages[0];
    let (build_image, build_name) = df.from(build);
    assert!(
        build_image.starts_with("rust:"),
        "build stage FROM {build_image}"
    );
    let build_name = build_name.expect("the build stage needs a name (FROM ... AS build)");
    let build_runs: String = Dockerfile::all(build, "RUN")
        .map(|i| i.args.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        build_runs.contains("cargo build --release --locked"),
        "build stage must run `cargo build --release --locked`: {build_runs}"
    );
    let (runtime_image, _) = df.from(df.runtime());
    assert!(
        runtime_image.contains("distroless") || runtime_image.contains("slim"),
        "runtime FROM {runtime_image}"
    );

    // ENTRYPOINT is the binary, copied from the build stage where the build put it.
    let entry = df.entrypoint();
    assert_eq!(entry, vec!["/usr/local/bin/idemproxy".to_string()]);
    let copies = Dockerfile::copies(df.runtime());
    let bin_copy = copies
        .iter()
        .find(|c| c.dest == entry[0])
        .unwrap_or_else(|| panic!("no COPY puts the binary at {}", entry[0]));
    assert_eq!(bin_copy.from.as_deref(), Some(build_name.as_str()));
    for src in &bin_copy.sources {
        assert!(
            build_runs.contains(src.as_str()),
            "the build stage never writes {src}"
        );
    }

    // CMD runs the config that COPY puts there: config/docker.toml.
    let cmd = df.cmd();
    assert_eq!(cmd.first().map(String::as_str), Some("run"), "CMD {cmd:?}");
    let config_path = df.config_path();
    let cfg_copy = copies
        .iter()
        .find(|c| c.dest == config_path)
        .unwrap_or_else(|| panic!("no COPY puts a config at {config_path}"));
    assert_eq!(cfg_copy.from, None);
    assert_eq!(cfg_copy.sources, vec!["config/docker.toml".to_string()]);
    assert!(repo().join("config/docker.toml").is_file());
    // `check` and `health` in the container find the same config without flags.
    assert_eq!(
        df.env_var("IDEMPROXY_CONFIG").as_deref(),
        Some(config_path.as_str())
    );

    // Both listeners' ports are exposed, and nothing else.
    let ports: BTreeSet<u16> = [cfg.server.listen.port(), cfg.admin.listen.port()].into();
    assert_eq!(df.exposed(), ports, "EXPOSE vs server.listen/admin.listen");

    // The health check is the binary's own probe, in exec form, bounded below Docker's timeout.
    let (hc_flags, hc_cmd) = df.healthcheck();
    let mut expected = entry.clone();
    expected.push("health".into());
    assert_eq!(hc_cmd, expected, "HEALTHCHECK CMD");
    let docker_timeout =
        humantime::parse_duration(hc_flags.get("timeout").expect("HEALTHCHECK --timeout")).unwrap();
    assert!(
        idemproxy::health::DEFAULT_TIMEOUT < docker_timeout,
        "the probe's own timeout must end before Docker's --timeout={docker_timeout:?}"
    );
    humantime::parse_duration(hc_flags.get("interval").expect("HEALTHCHECK --interval")).unwrap();

    // Non-root, numerically; the data volume is the store path and belongs to that user.
    let uid = df.uid();
    assert_ne!(uid, 0, "the image must not run as root");
    let store_path = cfg.store.path.to_str().unwrap().to_string();
    assert!(
        df.volumes().contains(&store_path),
        "VOLUME {:?} vs store.path {store_path}",
        df.volumes()
    );
    let data_copy = copies
        .iter()
        .find(|c| c.dest == store_path)
        .unwrap_or_else(|| panic!("no COPY creates {store_path} for the runtime user"));
    let owner = data_copy.chown.as_deref().unwrap_or("");
    assert_eq!(
        owner.split(':').next(),
        Some(uid.to_string().as_str()),
        "{store_path} owner"
    );

    assert_eq!(df.one("STOPSIGNAL").args, "SIGTERM");
}

// ---------------------------------------------------------------------------------------------------------
// .dockerignore

/// Docker's rule: the last pattern that matches the path or one of its parent directories decides; `!`
/// re-includes.
fn dockerignored(patterns: &[String], path: &str) -> bool {
    let comps: Vec<&str> = path.split('/').collect();
    let mut ignored = false;
    for raw in patterns {
        let (negate, pat) = match raw.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, raw.as_str()),
        };
        let pat = pat.trim_start_matches('/').trim_end_matches('/');
        let glob = globset::GlobBuilder::new(pat)
            .literal_separator(true)
            .build()
            .unwrap_or_else(|e| panic!(".dockerignore pattern {raw:?}: {e}"))
            .compile_matcher();
        let hit = (1..=comps.len()).any(|n| glob.is_match(comps[..n].join("/")));
        if hit {
            ignored = !negate;
        }
    }
    ignored
}

#[test]
fn dockerignore_keeps_what_the_build_needs() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    // Sanity of the matcher itself, so that a pass below means something.
    assert!(dockerignored(
        &["target".into()],
        "target/release/idemproxy"
    ));
    assert!(!dockerignored(
        &["target".into(), "!target".into()],
        "target/x"
    ));

    // The manifest, the lock file, every target Cargo.toml declares, and the config the image copies.
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".to_string(),
        "src/main.rs".to_string(),
        "src/lib.rs".to_string(),
    ];
    for copy in Dockerfile::copies(Dockerfile::load().runtime()) {
        if copy.from.is_none() {
            needed.extend(copy.sources);
        }
    }
    if let Some(p) = manifest
        .get("lib")
        .and_then(|l| l.get("path"))
        .and_then(|p| p.as_str())
    {
        needed.push(p.to_string());
    }
    for (kind, dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = match t.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_string(),
                None => format!(
                    "{dir}/{}.rs",
                    t.get("name").and_then(|n| n.as_str()).unwrap()
                ),
            };
            needed.push(path);
        }
    }
    for path in &needed {
        assert!(
            repo().join(path).exists(),
            "{path} is needed by the build but missing from the repo"
        );
        assert!(
            !dockerignored(&patterns, path),
            ".dockerignore excludes {path}, which the build needs"
        );
    }
    // And what must stay out of the context.
    for path in ["target/release/idemproxy", ".git/HEAD", "data/db"] {
        assert!(
            dockerignored(&patterns, path),
            ".dockerignore should exclude {path}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// The image's command, run as the binary.

/// The image's argv and env with container paths mapped to this checkout, plus `extra` env on top.
fn image_command(
    df: &Dockerfile,
    argv: Vec<String>,
    extra: &[(String, String)],
) -> (Vec<String>, Vec<(String, String)>) {
    let config_path = df.config_path();
    let repo_config = repo().join("config/docker.toml").display().to_string();
    let map = |s: &str| {
        if s == config_path {
            repo_config.clone()
        } else {
            s.to_string()
        }
    };
    assert_eq!(argv[0], df.entrypoint()[0], "argv[0]");
    let args = argv[1..].iter().map(|a| map(a)).collect();
    let mut envs: Vec<(String, String)> = df.env().into_iter().map(|(k, v)| (k, map(&v))).collect();
    envs.extend(extra.iter().cloned());
    (args, envs)
}

fn pairs(envs: &[(String, String)]) -> Vec<(&str, &str)> {
    envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test]
async fn image_command_runs_a_working_proxy() {
    let df = Dockerfile::load();
    let upstream = Upstream::start();
    let dir = tempfile::Builder::new()
        .prefix("idemproxy-image-")
        .tempdir()
        .unwrap();
    let data = dir.path().join("data");
    // What differs from the container: loopback with free ports, a temp data dir, the test upstream.
    let overrides = [
        ("IDEMPROXY_LISTEN".to_string(), "127.0.0.1:0".to_string()),
        (
            "IDEMPROXY_ADMIN_LISTEN".to_string(),
            "127.0.0.1:0".to_string(),
        ),
        ("IDEMPROXY_DATA_DIR".to_string(), data.display().to_string()),
        ("IDEMPROXY_UPSTREAM".to_string(), upstream.url()),
    ];
    let mut argv = df.entrypoint();
    argv.extend(df.cmd());
    let (args, envs) = image_command(&df, argv, &overrides);
    let mut proxy = Proxy::start_in(dir, args, envs).await;

    // Forwarded once, recorded, replayed.
    let first = post_key(proxy.addr, "/echo", "image-k1", "hello from the image").await;
    first.assert_forwarded(201, b"hello from the image");
    let again = post_key(proxy.addr, "/echo", "image-k1", "hello from the image").await;
    again.assert_replay(201, b"hello from the image");
    assert_eq!(
        upstream.hits_path("/echo"),
        1,
        "the retry must not reach the upstream"
    );
    let entries = std::fs::read_dir(&data)
        .unwrap_or_else(|e| panic!("data dir {} not created: {e}", data.display()))
        .count();
    assert!(entries > 0, "sled wrote nothing to {}", data.display());

    // Admin: health and readiness open; /admin/* disabled with no token, as the image ships.
    assert_eq!(proxy.admin_get("/healthz").await.status, 200);
    assert_eq!(proxy.admin_get("/readyz").await.status, 200);
    assert_eq!(
        proxy.admin_get("/admin/keys/default/image-k1").await.status,
        404
    );

    // The HEALTHCHECK command in the image's env (its admin address given the way a container would).
    let (_, hc) = df.healthcheck();
    let admin = [(
        "IDEMPROXY_ADMIN_LISTEN".to_string(),
        proxy.admin.to_string(),
    )];
    let (hc_args, hc_env) = image_command(&df, hc.clone(), &admin);
    let hc_args: Vec<&str> = hc_args.iter().map(String::as_str).collect();
    let (out, _) = health(&hc_args, &pairs(&hc_env));
    assert_eq!(
        out.code(),
        Some(0),
        "HEALTHCHECK against the live proxy:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.contains(&proxy.admin.to_string()),
        "probed elsewhere: {}",
        out.stdout
    );

    // STOPSIGNAL: a clean drain, exit 0; then the health check turns unhealthy.
    assert_eq!(df.one("STOPSIGNAL").args, "SIGTERM");
    let status = proxy.sigterm().await;
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
    let (out, took) = health(&hc_args, &pairs(&hc_env));
    assert_eq!(
        out.code(),
        Some(1),
        "HEALTHCHECK after the proxy stopped:\n{}",
        out.stderr
    );
    assert!(took < PROBE_BOUND, "probe of a stopped proxy took {took:?}");
}

// ---------------------------------------------------------------------------------------------------------
// idemproxy health

#[tokio::test]
async fn health_reports_a_live_proxy_healthy_and_a_stopped_one_unhealthy() {
    let upstream = Upstream::start();
    let mut proxy = Proxy::builder(upstream.url()).start().await;
    let url = format!("http://{}/healthz", proxy.admin);

    let (out, _) = health(&["health", "--url", &url], &[]);
    assert_eq!(out.code(), Some(0), "health --url {url}:\n{}", out.stderr);
    assert!(out.stdout.contains("200"), "stdout {:?}", out.stdout);
    let (out, _) = health(&["health"], &[("IDEMPROXY_HEALTH_URL", &url)]);
    assert_eq!(
        out.code(),
        Some(0),
        "IDEMPROXY_HEALTH_URL={url}:\n{}",
        out.stderr
    );
    // From the admin address alone, and from a config file's admin.listen.
    let admin = proxy.admin.to_string();
    let (out, _) = health(&["health", "--admin-listen", &admin], &[]);
    assert_eq!(
        out.code(),
        Some(0),
        "--admin-listen {admin}:\n{}",
        out.stderr
    );
    let cfg = proxy.dir().join("health.toml");
    std::fs::write(&cfg, format!("[admin]\nlisten = \"{admin}\"\n")).unwrap();
    let (out, _) = health(&["health"], &[("IDEMPROXY_CONFIG", cfg.to_str().unwrap())]);
    assert_eq!(
        out.code(),
        Some(0),
        "IDEMPROXY_CONFIG with admin.listen {admin}:\n{}",
        out.stderr
    );

    // Not 200 is unhealthy, even from a live listener.
    let (out, _) = health(
        &[
            "health",
            "--url",
            &format!("http://{}/nothing-here", proxy.admin),
        ],
        &[],
    );
    assert_eq!(
        out.code(),
        Some(1),
        "a 404 must be unhealthy:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("404"), "stderr {:?}", out.stderr);

    assert_eq!(proxy.sigterm().await.code(), Some(0));
    let (out, took) = health(&["health", "--url", &url], &[]);
    assert_eq!(
        out.code(),
        Some(1),
        "health after the proxy stopped:\n{}",
        out.stderr
    );
    assert!(took < PROBE_BOUND, "took {took:?}");
}

#[test]
fn health_fails_fast_on_dead_silent_and_erroring_targets() {
    // Nothing listening: refused at once.
    let dead = dead_addr();
    let (out, took) = health(&["health", "--url", &format!("http://{dead}/healthz")], &[]);
    assert_eq!(out.code(), Some(1), "dead port:\n{}", out.stderr);
    assert!(took < PROBE_BOUND, "dead port took {took:?}");
    assert!(out.stderr.contains("unhealthy"), "stderr {:?}", out.stderr);

    // A port that accepts (the kernel's backlog) but never answers: the timeout ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/healthz", silent.local_addr().unwrap());
    let (out, took) = health(&["health", "--url", &silent_url, "--timeout", "300ms"], &[]);
    assert_eq!(out.code(), Some(1), "silent port:\n{}", out.stderr);
    assert!(
        took < PROBE_BOUND,
        "silent port with --timeout 300ms took {took:?}"
    );
    assert!(
        out.stderr.contains("no answer within"),
        "stderr {:?}",
        out.stderr
    );
    // The default timeout is short too (the image's HEALTHCHECK passes none).
    let (out, took) = health(&["health", "--url", &silent_url], &[]);
    assert_eq!(
        out.code(),
        Some(1),
        "silent port, default timeout:\n{}",
        out.stderr
    );
    assert!(
        took >= idemproxy::health::DEFAULT_TIMEOUT
            && took < idemproxy::health::DEFAULT_TIMEOUT + PROBE_BOUND,
        "silent port with the default timeout took {took:?}"
    );
    drop(silent);

    // A live server answering 503.
    let upstream = Upstream::start();
    let (out, _) = health(
        &["health", "--url", &format!("{}/status/503", upstream.url())],
        &[],
    );
    assert_eq!(out.code(), Some(1), "503:\n{}", out.stderr);
    assert!(out.stderr.contains("503"), "stderr {:?}", out.stderr);
    let (out, _) = health(
        &["health", "--url", &format!("{}/status/200", upstream.url())],
        &[],
    );
    assert_eq!(
        out.code(),
        Some(0),
        "200 from any server is healthy:\n{}",
        out.stderr
    );

    // Unusable input is unhealthy (1), never Docker's reserved 2.
    for bad in [
        vec!["health", "--url", "https://127.0.0.1:9/healthz"],
        vec!["health", "--url", "no url"],
        vec![
            "health",
            "--url",
            "http://127.0.0.1:9/healthz",
            "--timeout",
            "soon",
        ],
        vec!["health", "--config", "/nonexistent/idemproxy.toml"],
    ] {
        let (out, took) = health(&bad, &[]);
        assert_eq!(out.code(), Some(1), "{bad:?}:\n{}", out.stderr);
        assert!(took < PROBE_BOUND, "{bad:?} took {took:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// YAML helpers

fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
        })
        .filter(|v: &Value| !v.is_null())
        .collect();
    assert!(!docs.is_empty(), "{rel} has no documents");
    docs
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    seq(v, what)
        .iter()
        .map(|x| s(x, what).to_string())
        .collect()
}

/// `humantime` duration of a YAML string such as `40s`.
fn duration(v: &Value, what: &str) -> Duration {
    humantime::parse_duration(s(v, what)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Host and port of an `http://host:port` URL.
fn host_port(url: &str) -> (String, u16) {
    let u: http::Uri = url.parse().unwrap_or_else(|e| panic!("URL {url:?}: {e}"));
    (u.host().unwrap().to_string(), u.port_u16().unwrap_or(80))
}

// ---------------------------------------------------------------------------------------------------------
// docker/compose.yaml

#[test]
fn compose_file_parses_and_points_at_real_files() {
    let df = Dockerfile::load();
    let base = repo().join("docker");
    let docs = yaml_docs("docker/compose.yaml");
    assert_eq!(docs.len(), 1, "one compose document");
    let compose = &docs[0];
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<String> = services
        .keys()
        .map(|k| s(k, "service name").to_string())
        .collect();
    let named_volumes: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(|k| s(k, "volume").to_string()).collect())
        .unwrap_or_default();
    let config_path = df.config_path();
    let (_, hc) = df.healthcheck();
    let exposed = df.exposed();
    let store_path = docker_config().store.path.display().to_string();

    let mut proxies = 0;
    let mut sled_volumes = Vec::new();
    let mut redis_proxies = 0;
    for (name, svc) in services {
        let name = s(name, "service");
        let is_proxy = svc["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("idemproxy"));
        if !svc["build"].is_null() {
            let ctx = base.join(s(&svc["build"]["context"], "build.context"));
            assert!(
                ctx.is_dir(),
                "{name}: build context {} missing",
                ctx.display()
            );
            let dockerfile = ctx.join(svc["build"]["dockerfile"].as_str().unwrap_or("Dockerfile"));
            assert!(
                dockerfile.is_file(),
                "{name}: {} missing",
                dockerfile.display()
            );
            assert_eq!(
                dockerfile.canonicalize().unwrap(),
                repo().join("Dockerfile").canonicalize().unwrap(),
                "{name} builds another Dockerfile"
            );
        }
        // Every bind mount names a file or directory of the repo; every named volume is declared.
        let mut mounted_config = None;
        let mut data_volume = None;
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let spec = s(v, "volume");
            let mut parts = spec.split(':');
            let (src, target) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            if src.starts_with('.') || src.starts_with('/') {
                let p = base.join(src);
                assert!(
                    p.exists(),
                    "{name}: bind mount source {} does not exist",
                    p.display()
                );
                if target == config_path {
                    mounted_config = Some(p);
                }
            } else {
                assert!(
                    named_volumes.contains(src),
                    "{name}: volume {src} not declared under volumes:"
                );
                if target == store_path {
                    data_volume = Some(src.to_string());
                }
            }
        }
        if !is_proxy {
            continue;
        }
        proxies += 1;
        assert!(
            svc["build"].is_mapping(),
            "{name}: builds the image it runs"
        );
        assert!(
            svc["command"].is_null() && svc["entrypoint"].is_null(),
            "{name}: keep the image's command"
        );
        // The config it runs: a mounted one, or the image's config/docker.toml.
        let config_file = mounted_config.unwrap_or_else(|| repo().join("config/docker.toml"));
        let out = check(&config_file);
        assert_eq!(
            out.code(),
            Some(0),
            "{name}: {} fails check:\n{}",
            config_file.display(),
            out.stderr
        );
        let cfg = load_config(&config_file);
        let env = &svc["environment"];

        // The upstream is the app service, on a port it exposes.
        let upstream = env["IDEMPROXY_UPSTREAM"]
            .as_str()
            .map_or(cfg.upstream.url.to_string(), str::to_string);
        let (host, port) = host_port(&upstream);
        assert!(
            names.contains(&host),
            "{name}: upstream host {host} is not a service"
        );
        let app_ports: Vec<String> = svc_ports(&services[host.as_str()]);
        assert!(
            app_ports.contains(&port.to_string()),
            "{name}: {host} does not expose {port} ({app_ports:?})"
        );

        // Published ports are exposed by the image; the admin port only on the host's loopback.
        for p in svc["ports"].as_sequence().into_iter().flatten() {
            let spec = s(p, "port");
            let container: u16 = spec
                .rsplit(':')
                .next()
                .unwrap()
                .trim_end_matches("/tcp")
                .parse()
                .unwrap();
            assert!(
                exposed.contains(&container),
                "{name}: publishes {container}, not EXPOSEd"
            );
            if container == cfg.admin.listen.port() {
                assert!(
                    spec.starts_with("127.0.0.1:"),
                    "{name}: admin port published beyond loopback: {spec}"
                );
            }
        }
        // The healthcheck is the image's; the grace period outlasts the drain.
        let test = strings(&svc["healthcheck"]["test"], "healthcheck.test");
        assert_eq!(test[0], "CMD", "{name}: exec form (no shell in the image)");
        assert_eq!(
            test[1..],
            hc[..],
            "{name}: healthcheck differs from the Dockerfile's"
        );
        let grace = duration(&svc["stop_grace_period"], "stop_grace_period");
        assert!(
            grace > cfg.server.shutdown_grace,
            "{name}: stop_grace_period {grace:?} <= shutdown_grace"
        );

        match cfg.store.backend {
            Backend::Sled => {
                let vol = data_volume
                    .unwrap_or_else(|| panic!("{name}: sled needs a volume at {store_path}"));
                sled_volumes.push(vol);
            }
            Backend::Redis => {
                redis_proxies += 1;
                let url = env["IDEMPROXY_REDIS_URL"]
                    .as_str()
                    .map(str::to_string)
                    .or(cfg.store.redis_url.clone())
                    .unwrap();
                let (redis, _) = host_port(&url.replacen("redis", "http", 1));
                assert!(
                    names.contains(&redis),
                    "{name}: Redis host {redis} is not a service"
                );
                for svc_name in [name, redis.as_str()] {
                    let profiles = strings(&services[svc_name]["profiles"], "profiles");
                    assert!(
                        profiles.contains(&"replicas".to_string()),
                        "{svc_name} not in profile replicas"
                    );
                }
            }
        }
    }
    assert!(proxies >= 1, "no idemproxy service");
    assert!(
        redis_proxies >= 2,
        "the replicas profile should run several proxies on Redis"
    );
    let distinct: BTreeSet<_> = sled_volumes.iter().collect();
    assert_eq!(
        distinct.len(),
        sled_volumes.len(),
        "two sled proxies share a volume: {sled_volumes:?}"
    );
}

/// Ports a compose service listens on: `expose` entries and container sides of `ports`.
fn svc_ports(svc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for key in ["expose", "ports"] {
        for p in svc[key].as_sequence().into_iter().flatten() {
            let p = match p {
                Value::Number(n) => n.to_string(),
                other => s(other, key).to_string(),
            };
            out.push(
                p.rsplit(':')
                    .next()
                    .unwrap()
                    .trim_end_matches("/tcp")
                    .to_string(),
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// docker/kubernetes.yaml

/// A container port by number or by name.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    let ports = seq(&container["ports"], "ports");
    match port {
        Value::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
        name => {
            let name = s(name, "port");
            let p = ports
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"));
            u16::try_from(p["containerPort"].as_u64().unwrap()).unwrap()
        }
    }
}

#[test]
fn kubernetes_manifest_parses_and_matches_the_image() {
    let df = Dockerfile::load();
    let docs = yaml_docs("docker/kubernetes.yaml");
    let of_kind = |kind: &str| -> Vec<&Value> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    for d in &docs {
        s(&d["apiVersion"], "apiVersion");
        s(&d["metadata"]["name"], "metadata.name");
    }
    let deployments = of_kind("Deployment");
    assert_eq!(deployments.len(), 1, "one Deployment");
    let deploy = deployments[0];
    let pod = &deploy["spec"]["template"];
    let spec = &pod["spec"];
    let containers = seq(&spec["containers"], "containers");
    assert!(containers.len() >= 2, "the app and the idemproxy sidecar");
    let proxy = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("idemproxy"))
        .expect("a container named idemproxy");
    assert!(s(&proxy["image"], "image").contains("idemproxy"));
    assert!(proxy["command"].is_null(), "keep the image's ENTRYPOINT");

    // Its config: a ConfigMap mounted where CMD reads it, with the same settings as config/docker.toml.
    let config_path = PathBuf::from(df.config_path());
    let (config_dir, config_file) = (
        config_path.parent().unwrap().to_str().unwrap(),
        config_path.file_name().unwrap().to_str().unwrap(),
    );
    let volumes = seq(&spec["volumes"], "volumes");
    let volume = |name: &str| -> &Value {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no pod volume {name}"))
    };
    let mounts = seq(&proxy["volumeMounts"], "volumeMounts");
    let mount_at = |path: &str| -> &Value {
        mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("idemproxy has no volume mounted at {path}"))
    };
    let cfg_volume = volume(s(&mount_at(config_dir)["name"], "mount name"));
    let cm_name = s(&cfg_volume["configMap"]["name"], "configMap.name");
    let cm = of_kind("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"].as_str() == Some(cm_name))
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not in the manifest"));
    let key = match cfg_volume["configMap"]["items"].as_sequence() {
        Some(items) => {
            let item = items
                .iter()
                .find(|i| i["path"].as_str() == Some(config_file))
                .unwrap_or_else(|| panic!("no ConfigMap item projects {config_file}"));
            s(&item["key"], "items.key").to_string()
        }
        None => config_file.to_string(),
    };
    let toml_text = s(&cm["data"][key.as_str()], "ConfigMap data");
    let cfg = Config::parse(toml_text, &Overrides::default())
        .unwrap_or_else(|e| panic!("the ConfigMap's {key} is invalid:\n{e}"));
    let in_map: toml::Table = toml_text.parse().unwrap();
    let in_repo: toml::Table = read("config/docker.toml").parse().unwrap();
    assert_eq!(
        in_map, in_repo,
        "the ConfigMap's {key} and config/docker.toml differ"
    );

    // Ports: the image's, named; probes on the admin port; the Service targets the proxy port.
    let ports: BTreeSet<u16> = seq(&proxy["ports"], "ports")
        .iter()
        .map(|p| u16::try_from(p["containerPort"].as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(ports, df.exposed(), "container ports vs EXPOSE");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &proxy[probe]["httpGet"];
        assert_eq!(s(&get["path"], probe), path, "{probe} path");
        assert_eq!(
            resolve_port(proxy, &get["port"]),
            cfg.admin.listen.port(),
            "{probe} port"
        );
    }
    let services = of_kind("Service");
    assert_eq!(services.len(), 1, "one Service");
    let svc = services[0];
    let labels = pod["metadata"]["labels"].as_mapping().expect("pod labels");
    for (k, v) in svc["spec"]["selector"]
        .as_mapping()
        .expect("Service selector")
    {
        assert_eq!(
            labels.get(k),
            Some(v),
            "Service selector {k:?} does not match the pod"
        );
    }
    for p in seq(&svc["spec"]["ports"], "Service ports") {
        assert_eq!(
            resolve_port(proxy, &p["targetPort"]),
            cfg.server.listen.port(),
            "Service targetPort"
        );
    }

    // The admin token comes from a Secret, never from the config.
    let env = seq(&proxy["env"], "env");
    let token = env
        .iter()
        .find(|e| e["name"].as_str() == Some("IDEMPROXY_ADMIN_TOKEN"))
        .expect("IDEMPROXY_ADMIN_TOKEN in the sidecar's env");
    assert!(token["value"].is_null(), "the token must not be inline");
    s(
        &token["valueFrom"]["secretKeyRef"]["name"],
        "secretKeyRef.name",
    );
    s(
        &token["valueFrom"]["secretKeyRef"]["key"],
        "secretKeyRef.key",
    );
    assert!(cfg.admin.token.is_none());

    // The data dir is a volume; sled is one process per dir, so more replicas need Redis.
    let data = volume(s(
        &mount_at(cfg.store.path.to_str().unwrap())["name"],
        "mount name",
    ));
    assert!(
        data["emptyDir"].is_mapping() || data["persistentVolumeClaim"].is_mapping(),
        "data volume {data:?}"
    );
    let replicas = deploy["spec"]["replicas"].as_u64().unwrap_or(1);
    assert!(
        replicas <= 1 || cfg.store.backend == Backend::Redis,
        "{replicas} replicas with a per-pod sled store: retries on another pod would run again"
    );

    // Graceful termination outlasts the drain.
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > cfg.server.shutdown_grace,
        "terminationGracePeriodSeconds {grace} <= server.shutdown_grace {:?}",
        cfg.server.shutdown_grace
    );

    // Non-root as the image's user, and a read-only root (sled writes only to the data volume).
    let uid = df.uid();
    let run_as = proxy["securityContext"]["runAsUser"]
        .as_u64()
        .or(spec["securityContext"]["runAsUser"].as_u64());
    assert_eq!(
        run_as,
        Some(u64::from(uid)),
        "runAsUser vs the Dockerfile's USER"
    );
    assert_eq!(
        spec["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert_eq!(
        proxy["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
}
