//! `tessera policy matrix|explain`: offline what-if analysis of NetworkPolicies over the output
//! of `kubectl get ns,pods,netpol -A -o yaml` (or any YAML/JSON manifests).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Read as _, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::matrix::{self, CellRef, Matrix, Probe, Source, Verdict};

use super::picture;
use policy::objects::{self, Object, Parsed};
use policy::{
    ContainerPort, Decision, Direction, Engine, Labels, PodKey, PolicyKey, ProbeParseError, Reason,
};
use serde::Serialize;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Every pod (and every --from-ip) against every pod: which connections the policies allow.
    Matrix(MatrixArgs),
    /// Why one connection is allowed or denied: egress of the source, ingress of the destination.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct InputArgs {
    /// Manifests to read: files, or directories searched recursively for *.yaml, *.yml and
    /// *.json. Multi-document YAML and `kind: List` (as `kubectl get ns,pods,netpol -A -o yaml`
    /// prints) are understood; objects of other kinds are skipped. `-` reads standard input:
    /// `kubectl get ns,pods,netpol -A -o yaml | tessera policy matrix -f -`.
    #[arg(short = 'f', long = "filename", value_name = "PATH", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct MatrixArgs {
    #[command(flatten)]
    input: InputArgs,
    /// A port to probe, as PORT/PROTOCOL (80/TCP, 53/udp) or PORT (TCP). Repeatable. Without
    /// it, each destination is probed on its own container ports.
    #[arg(long, value_name = "PORT[/PROTOCOL]", value_parser = parse_probe)]
    probe: Vec<Probe>,
    /// An external, IP-only source to add as a row (only ipBlocks can match it). Repeatable.
    #[arg(long = "from-ip", value_name = "IP")]
    from_ip: Vec<IpAddr>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Print only the cells that the staged policies (annotated `tessera.dev/staged: "true"`)
    /// would flip: the matrix of the enforced policies against the matrix with the staged ones
    /// added (a staged object replaces an enforced one of the same kind and name). With `-o
    /// json`: `{"flips":[{"from","to","port","protocol","enforced":{"allowed","reason"},
    /// "staged":{"allowed","reason"}}]}`. Without this flag staged policies are not evaluated.
    #[arg(long)]
    staged: bool,
}

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// The source: a pod as NAMESPACE/NAME, or an IP (an IP-only source).
    #[arg(long, value_name = "NAMESPACE/POD|IP")]
    from: String,
    /// The destination pod, as NAMESPACE/NAME.
    #[arg(long, value_name = "NAMESPACE/POD")]
    to: String,
    /// The port to explain, as PORT/PROTOCOL or PORT (TCP). Repeatable. Without it, every
    /// container port of the destination.
    #[arg(long, value_name = "PORT[/PROTOCOL]", value_parser = parse_probe)]
    probe: Vec<Probe>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// One truth table per probe.
    Table,
    /// `{"probes":[{"from","to","port","protocol","allowed","reason"}]}`.
    Json,
    /// Graphviz DOT: a cluster per namespace, a node per pod, an arrow per allowed pair
    /// labelled with its ports (`tessera policy matrix -o dot ... | dot -Tsvg > matrix.svg`).
    Dot,
    /// One self-contained HTML page: a coloured grid per probe, what decided each cell on hover.
    Html,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Matrix(args) => run_matrix(args),
        PolicyCommand::Explain(args) => run_explain(args),
    }
}

fn run_matrix(args: MatrixArgs) -> anyhow::Result<ExitCode> {
    let input = Input::load(&args.input.files)?;
    if args.staged {
        return run_staged(&input, &args);
    }
    let matrix = Matrix::new(&input.engine, &args.probe, &args.from_ip);
    emit(|out| match args.output {
        Output::Table => {
            writeln!(
                out,
                "rows: sources (pods numbered{}); columns: destinations by number",
                if args.from_ip.is_empty() {
                    ""
                } else {
                    ", then each --from-ip"
                }
            )?;
            writeln!(
                out,
                "'.' allowed, 'X' denied, '-' not probed (the pod itself)"
            )?;
            if args.probe.is_empty() {
                writeln!(
                    out,
                    "each block's columns: the pods that declare its port (--probe probes every pod)"
                )?;
            }
            if matrix.is_empty() {
                return writeln!(out, "nothing to show: {}", nothing_to_show(&input, &args));
            }
            for i in 0..matrix.probes().len() {
                if i > 0 {
                    writeln!(out)?;
                }
                out.write_all(matrix.render_block(i).as_bytes())?;
            }
            Ok(())
        }
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, &JsonMatrix { matrix: &matrix })?;
            writeln!(out)
        }
        Output::Dot => out.write_all(picture::dot(&matrix).as_bytes()),
        Output::Html => {
            let about = picture::About {
                inputs: input.files.clone(),
                notes: matrix_notes(&args),
                empty: nothing_to_show(&input, &args),
            };
            out.write_all(picture::html(&matrix, &about).as_bytes())
        }
    })
}

/// One cell a staged change flips.
#[derive(Serialize)]
struct Flip {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    enforced: FlipSide,
    staged: FlipSide,
}

#[derive(Serialize)]
struct FlipSide {
    allowed: bool,
    reason: String,
}

/// `--staged`: the cells whose verdict the staged policies change.
fn run_staged(input: &Input, args: &MatrixArgs) -> anyhow::Result<ExitCode> {
    let Some(staged) = &input.staged else {
        bail!(
            "--staged: no staged policy in the input (annotate a NetworkPolicy or admin policy \
             with metadata.annotations.\"{}\": \"true\")",
            objects::STAGED_ANNOTATION
        );
    };
    let enforced = Matrix::new(&input.engine, &args.probe, &args.from_ip);
    let with_staged = Matrix::new(staged, &args.probe, &args.from_ip);
    let key = |c: &CellRef<'_>| (c.from.to_string(), c.to.to_string(), c.probe);
    let mut after: BTreeMap<(String, String, Probe), CellRef<'_>> = BTreeMap::new();
    for c in with_staged.cells() {
        after.insert(key(&c), c);
    }
    let mut flips = Vec::new();
    let mut cells = 0usize;
    for c in enforced.cells() {
        cells += 1;
        let Some(s) = after.get(&key(&c)) else {
            continue;
        };
        if s.verdict.allowed != c.verdict.allowed {
            flips.push(Flip {
                from: c.from.to_string(),
                to: c.to.to_string(),
                port: c.probe.port,
                protocol: c.probe.protocol.to_string(),
                enforced: FlipSide {
                    allowed: c.verdict.allowed,
                    reason: c.verdict.detailed().to_string(),
                },
                staged: FlipSide {
                    allowed: s.verdict.allowed,
                    reason: s.verdict.detailed().to_string(),
                },
            });
        }
    }
    emit(|out| match args.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, &serde_json::json!({ "flips": flips }))?;
            writeln!(out)
        }
        _ => {
            writeln!(
                out,
                "staged policies ({}) would flip {} of {cells} cell{}",
                input.staged_names.join(", "),
                flips.len(),
                plural(cells)
            )?;
            for f in &flips {
                let verdict = |a: bool| if a { "allowed" } else { "denied" };
                writeln!(
                    out,
                    "{} -> {} {}/{}: {} -> {}\n    enforced: {}\n    staged:   {}",
                    f.from,
                    f.to,
                    f.port,
                    f.protocol,
                    verdict(f.enforced.allowed),
                    verdict(f.staged.allowed).to_uppercase(),
                    f.enforced.reason,
                    f.staged.reason
                )?;
            }
            Ok(())
        }
    })
}

/// Why a matrix has no cell.
fn nothing_to_show(input: &Input, args: &MatrixArgs) -> String {
    let pods = input.engine.workloads().count();
    if pods == 0 {
        "the input has no pods".to_owned()
    } else if args.probe.is_empty() {
        format!(
            "none of the {pods} pods declares a container port: name one with --probe PORT/PROTOCOL"
        )
    } else {
        format!("{pods} pod{} and no --from-ip", plural(pods))
    }
}

/// How the matrix was made, for the page: which probes, which extra sources.
fn matrix_notes(args: &MatrixArgs) -> Vec<String> {
    let mut notes = Vec::new();
    if args.probe.is_empty() {
        notes.push(
            "Probes: each destination on the ports its containers declare; a port's grid has a \
             column only for the pods that declare it (--probe probes every pod on a port)."
                .to_owned(),
        );
    } else {
        let mut probes = args.probe.clone();
        probes.sort();
        probes.dedup();
        let probes: Vec<String> = probes.iter().map(ToString::to_string).collect();
        notes.push(format!(
            "Probes (--probe): every pod on {}.",
            probes.join(", ")
        ));
    }
    if !args.from_ip.is_empty() {
        let mut ips = args.from_ip.clone();
        ips.sort();
        ips.dedup();
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        notes.push(format!(
            "IP-only sources (--from-ip), the last rows: {}; only ipBlock rules can match them.",
            ips.join(", ")
        ));
    }
    notes
}

/// A fresh engine with `objects` applied; any invalid object is an error listing them all.
fn load_engine(
    objects: &[objects::Located<Object>],
) -> anyhow::Result<(Engine, objects::LoadReport)> {
    let mut engine = Engine::new();
    let report = objects::load(&mut engine, objects);
    if !report.errors.is_empty() {
        bail!(error_list(
            "invalid input",
            report.errors.iter().map(|e| e.to_string())
        ));
    }
    Ok((engine, report))
}

/// Writes to standard output, buffered. A reader that goes away (`| head`) ends the output
/// quietly instead of with a panic.
fn emit(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> anyhow::Result<ExitCode> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(err) => Err(anyhow::Error::new(err).context("cannot write to standard output")),
    }
}

fn run_explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let input = Input::load(&args.input.files)?;
    let engine = &input.engine;
    let from = match args.from.parse::<IpAddr>() {
        Ok(ip) => Source::Ip(ip),
        Err(_) => {
            let key = parse_pod_key(&args.from).context("--from")?;
            input.known_pod(&key).context("--from")?;
            Source::Pod(key)
        }
    };
    let to = parse_pod_key(&args.to).context("--to")?;
    input.known_pod(&to).context("--to")?;

    let probes = if args.probe.is_empty() {
        let mut declared: Vec<Probe> = engine
            .workload(&to)
            .map(|w| {
                w.ports
                    .iter()
                    .map(|p| Probe {
                        port: p.port,
                        protocol: p.protocol,
                    })
                    .collect()
            })
            .unwrap_or_default();
        declared.sort();
        declared.dedup();
        if declared.is_empty() {
            bail!("{to} declares no container ports: name one with --probe PORT/PROTOCOL");
        }
        declared
    } else {
        args.probe
    };

    let mut text = String::new();
    for (i, probe) in probes.iter().enumerate() {
        let Some(verdict) = matrix::evaluate(engine, &from, &to, *probe) else {
            bail!(
                "cannot evaluate {} -> {to}: unknown workload",
                source_name(&from)
            );
        };
        if i > 0 {
            text.push('\n');
        }
        input.explain(&mut text, &from, &to, *probe, &verdict);
    }
    emit(|out| out.write_all(text.as_bytes()))
}

/// The objects read from `-f` paths, loaded into an engine.
struct Input {
    /// The enforced objects (staged policies left out).
    engine: Engine,
    /// Every object, staged policies included (a staged one replacing an enforced one of the
    /// same kind and name); `None` when the input stages nothing.
    staged: Option<Engine>,
    /// The staged policies, as `Kind namespace/name`.
    staged_names: Vec<String>,
    /// The files read, in order, as named in messages (`<stdin>` for standard input).
    files: Vec<String>,
    /// The policies as read (the last one of each key, as the engine keeps it), to quote rules.
    policies: BTreeMap<PolicyKey, NetworkPolicy>,
}

impl Input {
    fn load(paths: &[PathBuf]) -> anyhow::Result<Input> {
        let mut files = Vec::new();
        for path in paths {
            collect_files(path, &mut files, &mut HashSet::new())?;
        }
        if files.is_empty() {
            bail!(
                "no *.yaml, *.yml or *.json files under {}",
                display_paths(paths)
            );
        }
        let mut parsed = Parsed::default();
        let mut names = Vec::new();
        for file in &files {
            let (name, bytes) = if file.as_os_str() == "-" {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut bytes)
                    .context("<stdin>: cannot read")?;
                ("<stdin>".to_owned(), bytes)
            } else {
                let name = file.display().to_string();
                let bytes = std::fs::read(file).with_context(|| format!("{name}: cannot read"))?;
                (name, bytes)
            };
            let text = String::from_utf8(bytes)
                .map_err(|e| anyhow::anyhow!("{name}: not UTF-8 text: {e}"))?;
            parsed.extend(objects::parse(&name, &text));
            names.push(name);
        }
        if !parsed.errors.is_empty() {
            bail!(error_list(
                "invalid input",
                parsed.errors.iter().map(|e| e.to_string())
            ));
        }
        if !parsed.skipped.is_empty() {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for s in &parsed.skipped {
                *kinds.entry(s.kind.as_str()).or_default() += 1;
            }
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            eprintln!(
                "tessera: skipped {} object{} of other kinds ({})",
                parsed.skipped.len(),
                plural(parsed.skipped.len()),
                kinds.join(", ")
            );
        }

        // A later object replaces an earlier one of the same kind and name, as `kubectl apply`
        // would: how a what-if over a cluster dump plus a changed policy works. Say so.
        let mut first_seen: BTreeMap<(&str, String), &objects::Origin> = BTreeMap::new();
        for located in &parsed.objects {
            let key = (located.value.kind(), located.value.name());
            if located.value.is_staged() {
                if let Some(earlier) = first_seen.get(&key) {
                    eprintln!(
                        "tessera: {} {} from {} is staged: it replaces the one from {earlier} \
                         in the staged view only",
                        key.0, key.1, located.origin
                    );
                }
            } else if let Some(earlier) = first_seen.insert(key.clone(), &located.origin) {
                eprintln!(
                    "tessera: {} {} from {} replaces the one from {earlier}",
                    key.0, key.1, located.origin
                );
            }
        }

        let staged_names: Vec<String> = parsed
            .objects
            .iter()
            .filter(|o| o.value.is_staged())
            .map(|o| format!("{} {}", o.value.kind(), o.value.name()))
            .collect();
        // The staged view: every object; the enforced one: all but the staged policies.
        let (staged, enforced_objects) = if staged_names.is_empty() {
            (None, parsed.objects)
        } else {
            let (all, _) = load_engine(&parsed.objects)?;
            let enforced = parsed
                .objects
                .into_iter()
                .filter(|o| !o.value.is_staged())
                .collect();
            (Some(all), enforced)
        };
        let (engine, report) = load_engine(&enforced_objects)?;
        if !report.implied_namespaces.is_empty() {
            eprintln!(
                "tessera: namespace{} {} not in the input: assumed to have no labels but \
                 kubernetes.io/metadata.name",
                plural(report.implied_namespaces.len()),
                report.implied_namespaces.join(", ")
            );
        }

        let mut policies = BTreeMap::new();
        for located in enforced_objects {
            if let Object::NetworkPolicy(p) = located.value {
                let key = PolicyKey {
                    namespace: p.metadata.namespace.clone().unwrap_or_default(),
                    name: p.metadata.name.clone().unwrap_or_default(),
                };
                policies.insert(key, p);
            }
        }
        if staged.is_some() {
            eprintln!(
                "tessera: {} staged polic{} not enforced ({}): --staged shows what {} would change",
                staged_names.len(),
                if staged_names.len() == 1 { "y" } else { "ies" },
                staged_names.join(", "),
                if staged_names.len() == 1 {
                    "it"
                } else {
                    "they"
                }
            );
        }
        Ok(Input {
            engine,
            staged,
            staged_names,
            files: names,
            policies,
        })
    }

    fn known_pod(&self, key: &PodKey) -> anyhow::Result<()> {
        const MAX_LISTED: usize = 10;
        if self.engine.workload(key).is_some() {
            return Ok(());
        }
        let same_ns: Vec<&str> = self
            .engine
            .workloads()
            .filter(|w| w.key.namespace == key.namespace)
            .map(|w| w.key.name.as_str())
            .collect();
        if same_ns.is_empty() {
            bail!("unknown pod {key}: no pods in namespace {}", key.namespace);
        }
        // `--to demo/frontend` most likely meant one of the frontend-<hash> replicas.
        let close: Vec<&str> = same_ns
            .iter()
            .copied()
            .filter(|name| name.starts_with(key.name.as_str()))
            .collect();
        let (what, names) = if close.is_empty() {
            ("pods in namespace", same_ns)
        } else {
            ("did you mean, in namespace", close)
        };
        let mut listed = names[..names.len().min(MAX_LISTED)].join(", ");
        if names.len() > MAX_LISTED {
            let _ = write!(listed, " and {} more", names.len() - MAX_LISTED);
        }
        bail!("unknown pod {key} ({what} {}: {listed})", key.namespace)
    }

    /// Writes the reason for one connection in words.
    fn explain(
        &self,
        out: &mut String,
        from: &Source,
        to: &PodKey,
        probe: Probe,
        verdict: &Verdict,
    ) {
        let from_name = source_name(from);
        let _ = writeln!(
            out,
            "{from_name} -> {to} on {}/{}: {}",
            probe.port,
            probe.protocol,
            if verdict.allowed { "ALLOWED" } else { "DENIED" }
        );
        self.describe_source(out, from);
        self.describe_destination(out, to, probe);
        let _ = write!(out, "  egress of {from_name}: ");
        match (&verdict.egress, from) {
            (Some(decision), _) => self.explain_decision(out, decision, Direction::Egress),
            (None, Source::Ip(_)) => {
                let _ = writeln!(out, "not enforced (an IP-only source: no agent decides)");
            }
            (None, Source::Pod(_)) => {
                let _ = writeln!(
                    out,
                    "not enforced (host network pod: never a policy target; \
                     its peers see it by IP only)"
                );
            }
        }
        let _ = write!(out, "  ingress of {to}: ");
        self.explain_decision(out, &verdict.ingress, Direction::Ingress);
        let denied_by: Vec<&str> = [
            (verdict.egress.as_ref().is_some_and(|d| !d.allowed)).then_some("egress"),
            (!verdict.ingress.allowed).then_some("ingress"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let _ = if denied_by.is_empty() {
            writeln!(out, "  verdict: allowed (egress and ingress both allow it)")
        } else {
            writeln!(out, "  verdict: denied by {}", denied_by.join(" and "))
        };
    }

    /// What the decisions look at: the source's IP, labels and namespace labels.
    fn describe_source(&self, out: &mut String, from: &Source) {
        match from {
            Source::Ip(ip) => {
                let owner = self
                    .engine
                    .workloads()
                    .find(|w| w.ips.contains(ip))
                    .map(|w| {
                        format!(
                            " (the IP of {}; use --from {} for its identity)",
                            w.key, w.key
                        )
                    })
                    .unwrap_or_default();
                let _ = writeln!(out, "  source: {ip}, known by its IP only{owner}");
            }
            Source::Pod(key) => {
                let Some(w) = self.engine.workload(key) else {
                    return;
                };
                let _ = write!(out, "  source: {key} ({})", ips(&w.ips));
                if w.host_network {
                    let _ = writeln!(out, ", host network: known by its IP only");
                } else {
                    let ns = self.engine.namespace_labels_or_default(&key.namespace);
                    let _ = writeln!(
                        out,
                        ", labels {}; namespace {} labels {}",
                        labels(&w.labels),
                        key.namespace,
                        labels(&ns)
                    );
                }
            }
        }
    }

    /// The destination's labels and what the probed port is called there.
    fn describe_destination(&self, out: &mut String, to: &PodKey, probe: Probe) {
        let Some(w) = self.engine.workload(to) else {
            return;
        };
        let port = w
            .ports
            .iter()
            .find(|p| p.port == probe.port && p.protocol == probe.protocol);
        let port = match port {
            Some(ContainerPort {
                name: Some(name), ..
            }) => format!("port {probe} is named {name:?}"),
            Some(_) => format!("port {probe} is declared, unnamed"),
            None => format!("port {probe} is not declared by its containers"),
        };
        let _ = write!(out, "  destination: {to} ({})", ips(&w.ips));
        if w.host_network {
            let _ = writeln!(out, ", host network; {port}");
        } else {
            let _ = writeln!(out, ", labels {}; {port}", labels(&w.labels));
        }
    }

    fn explain_decision(&self, out: &mut String, decision: &Decision, direction: Direction) {
        let _ = writeln!(out, "{}", decision.in_direction(direction));
        match &decision.reason {
            Reason::AllowedBy(rule) => {
                if let Some(rule_yaml) = self.rule_yaml(&rule.policy, rule.direction, rule.index) {
                    let _ = writeln!(
                        out,
                        "    spec.{}[{}] of {}:",
                        direction_field(rule.direction),
                        rule.index,
                        rule.policy
                    );
                    for line in rule_yaml.lines() {
                        let _ = writeln!(out, "      {line}");
                    }
                }
            }
            // What each isolating policy does allow, so the missing piece can be seen.
            Reason::Isolated(policies) => {
                for key in policies {
                    self.summarize_rules(out, key, direction);
                }
            }
            _ => {}
        }
    }

    /// One line per rule of `key` in `direction`, in compact JSON.
    fn summarize_rules(&self, out: &mut String, key: &PolicyKey, direction: Direction) {
        const MAX_RULES: usize = 8;
        let dir = direction_field(direction);
        let Some(spec) = self.policies.get(key).and_then(|p| p.spec.as_ref()) else {
            return;
        };
        let rules: Vec<String> = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| serde_json::to_string(r).unwrap_or_default())
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| serde_json::to_string(r).unwrap_or_default())
                .collect(),
        };
        if rules.is_empty() {
            let _ = writeln!(out, "    {key}: no {dir} rules (allows no {dir})");
            return;
        }
        for (i, rule) in rules.iter().enumerate().take(MAX_RULES) {
            let _ = writeln!(out, "    {key} {dir} rule {i}: {rule}");
        }
        if rules.len() > MAX_RULES {
            let _ = writeln!(
                out,
                "    {key}: {} more {dir} rules",
                rules.len() - MAX_RULES
            );
        }
    }

    /// The rule as written, in YAML.
    fn rule_yaml(&self, key: &PolicyKey, direction: Direction, index: usize) -> Option<String> {
        let spec = self.policies.get(key)?.spec.as_ref()?;
        let text = match direction {
            Direction::Ingress => serde_norway::to_string(spec.ingress.as_ref()?.get(index)?),
            Direction::Egress => serde_norway::to_string(spec.egress.as_ref()?.get(index)?),
        };
        text.ok()
    }
}

/// `a=1,b=2`, as `kubectl get --show-labels` writes them; `<none>` when empty.
fn labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return "<none>".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn ips(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return "no IP".to_owned();
    }
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn direction_field(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

struct JsonMatrix<'a> {
    matrix: &'a Matrix<'a>,
}

impl Serialize for JsonMatrix<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        struct Cells<'a>(&'a Matrix<'a>);
        impl Serialize for Cells<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                // Computed and written one cell at a time: a 1,000-pod matrix has a million.
                serializer.collect_seq(self.0.cells().map(JsonCell))
            }
        }
        let mut doc = serializer.serialize_struct("JsonMatrix", 1)?;
        doc.serialize_field("probes", &Cells(self.matrix))?;
        doc.end()
    }
}

/// `{"from","to","port","protocol","allowed","reason"}`, written straight from the borrowed
/// cell: no string is built for it.
struct JsonCell<'a>(CellRef<'a>);

impl Serialize for JsonCell<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        struct Text<T>(T);
        impl<T: std::fmt::Display> Serialize for Text<T> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(&self.0)
            }
        }
        let cell = &self.0;
        let mut doc = serializer.serialize_struct("JsonCell", 6)?;
        doc.serialize_field("from", &Text(cell.from))?;
        doc.serialize_field("to", &Text(cell.to))?;
        doc.serialize_field("port", &cell.probe.port)?;
        doc.serialize_field("protocol", &Text(cell.probe.protocol))?;
        doc.serialize_field("allowed", &cell.verdict.allowed)?;
        doc.serialize_field("reason", &Text(cell.verdict.detailed()))?;
        doc.end()
    }
}

fn source_name(source: &Source) -> String {
    match source {
        Source::Pod(key) => key.to_string(),
        Source::Ip(ip) => ip.to_string(),
    }
}

/// `80/TCP`, `53/udp`, `8080` (TCP).
fn parse_probe(text: &str) -> Result<Probe, ProbeParseError> {
    text.parse()
}

fn parse_pod_key(text: &str) -> anyhow::Result<PodKey> {
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(PodKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => bail!("{text:?} is not NAMESPACE/POD (or, for --from, an IP)"),
    }
}

/// Adds `path` (a file, taken whatever its name) or the manifests under it (a directory,
/// recursively: *.yaml, *.yml, *.json, sorted; hidden entries such as a ConfigMap volume's
/// `..data` skipped; symlinked directories followed once).
fn collect_files(
    path: &Path,
    files: &mut Vec<PathBuf>,
    seen_dirs: &mut HashSet<PathBuf>,
) -> anyhow::Result<()> {
    if path.as_os_str() == "-" {
        if !files.iter().any(|f| f.as_os_str() == "-") {
            files.push(path.to_owned());
        }
        return Ok(());
    }
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_dir() {
        files.push(path.to_owned());
        return Ok(());
    }
    let canonical =
        std::fs::canonicalize(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !seen_dirs.insert(canonical) {
        return Ok(());
    }
    let mut entries = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("{}: cannot read", path.display()))?
    {
        let entry = entry.with_context(|| format!("{}: cannot read", path.display()))?;
        entries.push(entry.path());
    }
    entries.sort();
    for entry in entries {
        let hidden = entry
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        let meta = std::fs::metadata(&entry)
            .with_context(|| format!("{}: cannot read", entry.display()))?;
        if meta.is_dir() {
            collect_files(&entry, files, seen_dirs)?;
        } else if is_manifest(&entry) {
            files.push(entry);
        }
    }
    Ok(())
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml" | "json"))
}

fn error_list(what: &str, errors: impl Iterator<Item = String>) -> String {
    let errors: Vec<String> = errors.collect();
    if errors.len() == 1 {
        return format!("{what}: {}", errors[0]);
    }
    let mut text = format!("{what} ({} errors):", errors.len());
    for e in errors {
        text.push_str("\n  ");
        text.push_str(&e);
    }
    text
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    use policy::Protocol;

    #[test]
    fn probes_parse_with_default_and_any_case_protocol() {
        let p = |port, protocol| Probe { port, protocol };
        assert_eq!(parse_probe("80/TCP").ok(), Some(p(80, Protocol::Tcp)));
        assert_eq!(parse_probe("80").ok(), Some(p(80, Protocol::Tcp)));
        assert_eq!(parse_probe("53/udp").ok(), Some(p(53, Protocol::Udp)));
        assert_eq!(parse_probe("9/Sctp").ok(), Some(p(9, Protocol::Sctp)));
        for bad in ["0/TCP", "65536", "http/TCP", "80/ICMP", "", "/TCP", "80/"] {
            assert!(parse_probe(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_keys_need_namespace_and_name() {
        assert_eq!(
            parse_pod_key("demo/web").ok(),
            Some(PodKey {
                namespace: "demo".into(),
                name: "web".into()
            })
        );
        for bad in ["web", "/web", "demo/", "a/b/c"] {
            assert!(parse_pod_key(bad).is_err(), "{bad}");
        }
    }
}
