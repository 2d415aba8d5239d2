//! `tessera policy matrix|explain`, run as the real binary on manifests as kubectl writes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const THREE_TIER: &str = "tests/fixtures/three-tier.yaml";

const EXTERNAL: &str = "demo/external-7c4b9d5f8-qm2zt";
const FRONTEND_A: &str = "demo/frontend-6b7d9c8f5-5d8f7";
const FRONTEND_B: &str = "demo/frontend-6b7d9c8f5-9kx2p";
const BACKEND_A: &str = "demo/backend-58c6d7b9f4-h4v7c";
const BACKEND_B: &str = "demo/backend-58c6d7b9f4-r8w2n";
const DATABASE_0: &str = "demo/database-0";
const DATABASE_1: &str = "demo/database-1";
const COREDNS: &str = "kube-system/coredns-674b8bbfcf-8fjsw";
const KUBE_PROXY: &str = "kube-system/kube-proxy-x7d2k";
const ALL_PODS: [&str; 9] = [
    EXTERNAL, FRONTEND_A, FRONTEND_B, BACKEND_A, BACKEND_B, DATABASE_0, DATABASE_1, COREDNS,
    KUBE_PROXY,
];

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn tessera(args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

fn ok(args: &[&str]) -> Run {
    let run = tessera(args);
    assert_eq!(
        run.code,
        Some(0),
        "{args:?}\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    run
}

/// Runs `args` expecting exit 2, and returns stderr.
fn fails(args: &[&str]) -> String {
    let run = tessera(args);
    assert_eq!(
        run.code,
        Some(2),
        "{args:?}\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{args:?} printed {}", run.stdout);
    run.stderr
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `(from, to, "port/protocol") -> allowed` from `matrix -o json`.
fn json_matrix(args: &[&str]) -> BTreeMap<(String, String, String), bool> {
    let mut full = vec!["policy", "matrix", "-o", "json"];
    full.extend_from_slice(args);
    let run = ok(&full);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    let mut cells = BTreeMap::new();
    for cell in doc["probes"].as_array().unwrap() {
        let key = (
            cell["from"].as_str().unwrap().to_owned(),
            cell["to"].as_str().unwrap().to_owned(),
            format!("{}/{}", cell["port"], cell["protocol"].as_str().unwrap()),
        );
        let previous = cells.insert(key, cell["allowed"].as_bool().unwrap());
        assert!(previous.is_none(), "duplicate cell {cell}");
    }
    cells
}

#[track_caller]
fn assert_cells(
    cells: &BTreeMap<(String, String, String), bool>,
    probe: &str,
    expected: &[(&str, &str, bool)],
) {
    for (from, to, allowed) in expected {
        let key = ((*from).to_owned(), (*to).to_owned(), probe.to_owned());
        assert_eq!(
            cells.get(&key),
            Some(allowed),
            "{from} -> {to} on {probe}: expected {}",
            if *allowed { "allowed" } else { "denied" }
        );
    }
}

#[test]
fn three_tier_matrix_allows_each_tier_only_from_the_tiers_before_it_and_itself() {
    let cells = json_matrix(&[
        "-f", THREE_TIER, "--probe", "80/TCP", "--probe", "8080/tcp", "--probe", "5432", "--probe",
        "9090/TCP", "--probe", "53/UDP",
    ]);
    // WebFrontend is reachable from External and WebFrontend.
    assert_cells(
        &cells,
        "80/TCP",
        &[
            (EXTERNAL, FRONTEND_A, true),
            (FRONTEND_B, FRONTEND_A, true),
            (FRONTEND_A, FRONTEND_B, true),
            (BACKEND_A, FRONTEND_A, false),
            (DATABASE_0, FRONTEND_A, false),
            (COREDNS, FRONTEND_A, false),
            (KUBE_PROXY, FRONTEND_A, false),
        ],
    );
    // BusinessBackend is reachable from WebFrontend and BusinessBackend (on its named port).
    assert_cells(
        &cells,
        "8080/TCP",
        &[
            (FRONTEND_A, BACKEND_A, true),
            (FRONTEND_B, BACKEND_B, true),
            (BACKEND_B, BACKEND_A, true),
            (EXTERNAL, BACKEND_A, false),
            (DATABASE_0, BACKEND_A, false),
            (COREDNS, BACKEND_A, false),
        ],
    );
    // ... and only on that port: its metrics port is closed even to the frontend.
    assert_cells(&cells, "9090/TCP", &[(FRONTEND_A, BACKEND_A, false)]);
    // Database is reachable from BusinessBackend and Database.
    assert_cells(
        &cells,
        "5432/TCP",
        &[
            (BACKEND_A, DATABASE_0, true),
            (BACKEND_B, DATABASE_1, true),
            (DATABASE_1, DATABASE_0, true),
            (DATABASE_0, DATABASE_1, true),
            (FRONTEND_A, DATABASE_0, false),
            (EXTERNAL, DATABASE_0, false),
        ],
    );
    // kube-system is not isolated; the database's egress policy lets it reach DNS only.
    assert_cells(
        &cells,
        "53/UDP",
        &[
            (EXTERNAL, COREDNS, true),
            (DATABASE_0, COREDNS, true),
            (DATABASE_0, KUBE_PROXY, false),
            (BACKEND_A, KUBE_PROXY, true),
        ],
    );
    // Every pod to every other pod, per probe; a pod to itself is left out.
    assert_eq!(cells.len(), 5 * 9 * 8);
    assert!(cells.keys().all(|(from, to, _)| from != to));
}

#[test]
fn json_output_has_the_documented_shape() {
    let run = ok(&[
        "policy",
        "matrix",
        "-f",
        THREE_TIER,
        "--probe",
        "80/TCP",
        "--from-ip",
        "203.0.113.7",
        "--output",
        "json",
    ]);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    let object = doc.as_object().unwrap();
    assert_eq!(object.keys().collect::<Vec<_>>(), ["probes"]);
    let probes = doc["probes"].as_array().unwrap();
    // 9 pods to 8 others, plus the external IP to all 9.
    assert_eq!(probes.len(), 9 * 8 + 9);
    for cell in probes {
        let cell = cell.as_object().unwrap();
        let mut keys: Vec<&str> = cell.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["allowed", "from", "port", "protocol", "reason", "to"]
        );
        assert!(cell["from"].is_string() && cell["to"].is_string());
        assert_eq!(cell["port"], 80);
        assert_eq!(cell["protocol"], "TCP");
        assert!(cell["allowed"].is_boolean());
        assert!(!cell["reason"].as_str().unwrap().is_empty());
    }
    let find = |from: &str, to: &str| {
        probes
            .iter()
            .find(|c| c["from"] == from && c["to"] == to)
            .unwrap_or_else(|| panic!("no cell {from} -> {to}"))
    };
    let external_ip = find("203.0.113.7", FRONTEND_A);
    assert_eq!(external_ip["allowed"], false);
    let allowed = find(EXTERNAL, FRONTEND_A);
    assert_eq!(allowed["allowed"], true);
    let reason = allowed["reason"].as_str().unwrap();
    // The reason covers both directions and names the allowing rule.
    assert!(reason.contains("egress"), "{reason}");
    assert!(reason.contains("demo/frontend ingress rule 0"), "{reason}");
    let denied = find(DATABASE_0, FRONTEND_A)["reason"].as_str().unwrap();
    assert!(denied.contains("demo/database"), "{denied}");
    assert!(denied.contains("demo/default-deny-ingress"), "{denied}");
}

#[test]
fn without_probes_each_destination_is_probed_on_its_own_ports() {
    let cells = json_matrix(&["-f", THREE_TIER]);
    let probes_of = |to: &str| {
        let mut probes: Vec<&str> = cells
            .keys()
            .filter(|(_, t, _)| t == to)
            .map(|(_, _, p)| p.as_str())
            .collect();
        probes.sort();
        probes.dedup();
        probes
    };
    assert_eq!(probes_of(FRONTEND_A), ["80/TCP"]);
    assert_eq!(probes_of(BACKEND_A), ["8080/TCP", "9090/TCP"]);
    assert_eq!(probes_of(DATABASE_0), ["5432/TCP"]);
    assert_eq!(probes_of(COREDNS), ["53/TCP", "53/UDP", "9153/TCP"]);
    // Pods that declare no ports are no destination.
    assert_eq!(probes_of(EXTERNAL), Vec::<&str>::new());
    assert_cells(&cells, "8080/TCP", &[(FRONTEND_A, BACKEND_A, true)]);
}

/// One block of the table as a reader sees it.
struct Block {
    title: String,
    /// Column numbers, read top to bottom from the header.
    columns: Vec<usize>,
    /// Per row: its number (none for an IP), its label, its marks under the columns.
    rows: Vec<(Option<usize>, String, Vec<char>)>,
}

impl Block {
    fn parse(text: &str) -> Block {
        let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
        let title: String = lines[0].iter().collect();
        assert!(title.starts_with("probe "), "{text}");
        let rows_start = 1 + lines[1..]
            .iter()
            .position(|l| l.iter().any(|c| c.is_alphabetic()))
            .unwrap();
        let header = &lines[1..rows_start];
        let width = header.iter().map(Vec::len).max().unwrap();
        let mut columns = Vec::new();
        let mut positions = Vec::new();
        for x in 0..width {
            let digits: String = header
                .iter()
                .filter_map(|l| l.get(x).filter(|c| c.is_ascii_digit()))
                .collect();
            if !digits.is_empty() {
                columns.push(digits.parse().unwrap());
                positions.push(x);
            }
        }
        let rows = lines[rows_start..]
            .iter()
            .map(|l| {
                let text: String = l.iter().collect();
                let mut tokens = text.split_whitespace();
                let first = tokens.next().unwrap();
                let (number, label) = match first.parse::<usize>() {
                    Ok(n) => (Some(n), tokens.next().unwrap().to_owned()),
                    Err(_) => (None, first.to_owned()),
                };
                let marks = positions
                    .iter()
                    .map(|x| l.get(*x).copied().unwrap_or(' '))
                    .collect();
                (number, label, marks)
            })
            .collect();
        Block {
            title,
            columns,
            rows,
        }
    }

    fn number_of(&self, label: &str) -> usize {
        self.rows.iter().find(|r| r.1 == label).unwrap().0.unwrap()
    }

    /// The mark in `from`'s row under `to`'s column.
    fn mark(&self, from: &str, to: &str) -> char {
        let column = self
            .columns
            .iter()
            .position(|c| *c == self.number_of(to))
            .unwrap();
        self.rows.iter().find(|r| r.1 == from).unwrap().2[column]
    }
}

#[test]
fn table_has_one_numbered_block_per_probe() {
    let run = ok(&[
        "policy",
        "matrix",
        "-f",
        THREE_TIER,
        "--probe",
        "80/TCP",
        "--probe",
        "5432/TCP",
        "--from-ip",
        "203.0.113.7",
    ]);
    let out = &run.stdout;
    let legend: Vec<&str> = out.lines().take(2).collect();
    assert!(
        legend[0]
            == "rows: sources (pods numbered, then each --from-ip); columns: destinations by number",
        "{out}"
    );
    assert!(
        legend[1].contains("'.' allowed") && legend[1].contains("'X' denied"),
        "{out}"
    );
    let text = out.split_once("\nprobe ").unwrap().1;
    let blocks: Vec<Block> = format!("probe {text}")
        .split("\n\n")
        .map(Block::parse)
        .collect();
    assert_eq!(blocks.len(), 2, "{out}");
    assert_eq!(blocks[0].title, "probe 80/TCP");
    assert_eq!(blocks[1].title, "probe 5432/TCP");
    let mut sorted = ALL_PODS;
    sorted.sort();
    for block in &blocks {
        // One row per pod, numbered in name order, then the external IP; every pod a column.
        assert_eq!(block.rows.len(), ALL_PODS.len() + 1);
        for (i, pod) in sorted.iter().enumerate() {
            assert_eq!(block.rows[i].0, Some(i + 1));
            assert_eq!(block.rows[i].1, *pod);
        }
        assert_eq!(block.rows[ALL_PODS.len()].0, None);
        assert_eq!(block.rows[ALL_PODS.len()].1, "203.0.113.7");
        assert_eq!(block.columns, (1..=ALL_PODS.len()).collect::<Vec<_>>());
    }
    // The table says what the JSON says.
    let json = json_matrix(&[
        "-f",
        THREE_TIER,
        "--probe",
        "80/TCP",
        "--probe",
        "5432/TCP",
        "--from-ip",
        "203.0.113.7",
    ]);
    for (block, probe) in blocks.iter().zip(["80/TCP", "5432/TCP"]) {
        for from in ALL_PODS.iter().chain(&["203.0.113.7"]) {
            for to in ALL_PODS {
                let expected =
                    match json.get(&((*from).to_owned(), to.to_owned(), probe.to_owned())) {
                        Some(true) => '.',
                        Some(false) => 'X',
                        None => '-',
                    };
                assert_eq!(block.mark(from, to), expected, "{from} -> {to} on {probe}");
            }
        }
    }
    assert_eq!(blocks[0].mark(EXTERNAL, FRONTEND_A), '.');
    assert_eq!(blocks[0].mark(BACKEND_A, FRONTEND_A), 'X');
    assert_eq!(blocks[0].mark(FRONTEND_A, FRONTEND_A), '-');
}

#[test]
fn without_probes_a_block_has_only_the_pods_that_declare_its_port() {
    let run = ok(&["policy", "matrix", "-f", THREE_TIER]);
    let text = run.stdout.split_once("\nprobe ").unwrap().1;
    let blocks: Vec<Block> = format!("probe {text}")
        .split("\n\n")
        .map(Block::parse)
        .collect();
    let titles: Vec<&str> = blocks.iter().map(|b| b.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "probe 53/TCP",
            "probe 53/UDP",
            "probe 80/TCP",
            "probe 5432/TCP",
            "probe 8080/TCP",
            "probe 9090/TCP",
            "probe 9153/TCP"
        ]
    );
    let postgres = &blocks[3];
    let databases = [
        postgres.number_of(DATABASE_0),
        postgres.number_of(DATABASE_1),
    ];
    assert_eq!(postgres.columns, databases);
    // Every pod is still a row, with the same number in every block.
    assert_eq!(postgres.rows.len(), ALL_PODS.len());
    for block in &blocks {
        assert_eq!(block.number_of(DATABASE_0), databases[0]);
    }
    assert_eq!(postgres.mark(DATABASE_1, DATABASE_0), '.');
    assert_eq!(postgres.mark(FRONTEND_A, DATABASE_0), 'X');
}

/// 30 pods in three namespaces, with long kubectl-like names.
fn thirty_pods(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for ns in ["shop", "payments", "ops"] {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
        ));
        text.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: same-namespace\n  namespace: {ns}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelector: {{}}\n"
        ));
    }
    for i in 0..30 {
        let ns = ["shop", "payments", "ops"][i % 3];
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: service-{i:02}-7d9f8c6b5-x{i:02}kq\n  namespace: {ns}\n  labels: {{app: service-{i:02}}}\nspec:\n  containers:\n  - name: app\n    image: app:1\n    ports:\n    - containerPort: 8080\nstatus:\n  podIP: 10.0.{}.{}\n",
            i / 10,
            i + 10
        ));
    }
    let path = dir.join("thirty.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn table_at_thirty_pods_fits_a_terminal() {
    let dir = scratch("thirty-pods");
    let input = thirty_pods(&dir);
    let run = ok(&[
        "policy",
        "matrix",
        "-f",
        input.to_str().unwrap(),
        "--probe",
        "8080/TCP",
    ]);
    let out = &run.stdout;
    for line in out.lines() {
        assert!(line.chars().count() <= 100, "{} wide: {line}", line.len());
    }
    let text = out.split_once("\nprobe ").unwrap().1;
    let block = Block::parse(&format!("probe {text}"));
    assert_eq!(block.columns, (1..=30).collect::<Vec<_>>(), "{out}");
    assert_eq!(block.rows.len(), 30, "{out}");
    for (number, label, marks) in &block.rows {
        assert!(label.ends_with("kq"), "{label}");
        let number = number.unwrap();
        assert_eq!(marks[number - 1], '-', "{label}");
        // Same namespace: allowed (9 others); other namespaces: denied (20).
        assert_eq!(marks.iter().filter(|m| **m == '.').count(), 9, "{label}");
        assert_eq!(marks.iter().filter(|m| **m == 'X').count(), 20, "{label}");
    }
}

#[test]
fn explain_names_the_allowing_rules_and_quotes_them() {
    let run = ok(&[
        "policy", "explain", "-f", THREE_TIER, "--from", DATABASE_0, "--to", DATABASE_1, "--probe",
        "5432/TCP",
    ]);
    let out = &run.stdout;
    assert!(
        out.starts_with(&format!(
            "{DATABASE_0} -> {DATABASE_1} on 5432/TCP: ALLOWED\n"
        )),
        "{out}"
    );
    assert!(
        out.contains("allowed by demo/database egress rule 0"),
        "{out}"
    );
    assert!(
        out.contains("allowed by demo/database ingress rule 1"),
        "{out}"
    );
    assert!(out.contains("spec.egress[0] of demo/database:"), "{out}");
    // What the rules were matched against: labels, namespace labels, the port's name.
    assert!(
        out.contains(&format!(
            "  source: {DATABASE_0} (10.244.1.13), labels app=database,"
        )),
        "{out}"
    );
    assert!(
        out.contains(
            "namespace demo labels app.kubernetes.io/part-of=shop,kubernetes.io/metadata.name=demo"
        ),
        "{out}"
    );
    assert!(out.contains("port 5432/TCP is named \"postgres\""), "{out}");
    assert!(out.contains("role: Database"), "{out}");
    assert!(out.contains("verdict: allowed"), "{out}");
}

#[test]
fn explain_names_the_isolating_policies_of_each_side() {
    let run = ok(&[
        "policy", "explain", "-f", THREE_TIER, "--from", DATABASE_0, "--to", FRONTEND_A, "--probe",
        "80",
    ]);
    let out = &run.stdout;
    let egress = out.lines().find(|l| l.contains("egress of")).unwrap();
    assert!(
        egress.contains("denied: isolated for egress by demo/database"),
        "{out}"
    );
    let ingress = out.lines().find(|l| l.contains("ingress of")).unwrap();
    assert!(
        ingress.contains("denied: isolated for ingress by "),
        "{out}"
    );
    assert!(ingress.contains("demo/default-deny-ingress"), "{out}");
    assert!(ingress.contains("demo/frontend"), "{out}");
    assert!(out.contains("DENIED"), "{out}");
    assert!(
        out.contains("verdict: denied by egress and ingress"),
        "{out}"
    );
    // What the isolating policies do allow, one rule a line.
    assert!(
        out.contains(r#"    demo/frontend ingress rule 0: {"from":[{"podSelector":{"matchExpressions":[{"key":"role","operator":"In","values":["External","WebFrontend"]}]}}],"ports":[{"port":80,"protocol":"TCP"}]}"#),
        "{out}"
    );
    assert!(
        out.contains("    demo/default-deny-ingress: no ingress rules"),
        "{out}"
    );
    assert!(out.contains("    demo/database egress rule 1: "), "{out}");
}

#[test]
fn explain_from_an_ip_and_over_the_destination_ports() {
    let run = ok(&[
        "policy",
        "explain",
        "-f",
        THREE_TIER,
        "--from",
        "203.0.113.7",
        "--to",
        COREDNS,
    ]);
    let out = &run.stdout;
    for probe in ["53/TCP", "53/UDP", "9153/TCP"] {
        assert!(
            out.contains(&format!("203.0.113.7 -> {COREDNS} on {probe}: ALLOWED")),
            "{out}"
        );
    }
    assert!(out.contains("egress of 203.0.113.7: not enforced"), "{out}");
    assert!(
        out.contains("source: 203.0.113.7, known by its IP only\n"),
        "{out}"
    );
    // An IP that belongs to a pod is still only an IP, and the output says whose it is.
    let run = ok(&[
        "policy",
        "explain",
        "-f",
        THREE_TIER,
        "--from",
        "10.244.1.11",
        "--to",
        FRONTEND_B,
    ]);
    assert!(
        run.stdout.contains(&format!(
            "(the IP of {FRONTEND_A}; use --from {FRONTEND_A} for its identity)"
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("DENIED"), "{}", run.stdout);
    assert!(out.contains("not isolated"), "{out}");
}

#[test]
fn explain_an_unknown_pod_fails_naming_it() {
    let err = fails(&[
        "policy",
        "explain",
        "-f",
        THREE_TIER,
        "--from",
        "demo/ghost",
        "--to",
        FRONTEND_A,
    ]);
    assert!(err.contains("unknown pod demo/ghost"), "{err}");
    assert!(
        err.contains("database-0"),
        "lists the namespace's pods: {err}"
    );
    let err = fails(&[
        "policy",
        "explain",
        "-f",
        THREE_TIER,
        "--from",
        EXTERNAL,
        "--to",
        "demo/frontend",
    ]);
    assert!(
        err.contains("unknown pod demo/frontend (did you mean, in namespace demo: frontend-6b7d9c8f5-5d8f7, frontend-6b7d9c8f5-9kx2p)"),
        "{err}"
    );
    let err = fails(&[
        "policy",
        "explain",
        "-f",
        THREE_TIER,
        "--from",
        EXTERNAL,
        "--to",
        "nowhere/pod",
    ]);
    assert!(err.contains("unknown pod nowhere/pod"), "{err}");
    let err = fails(&[
        "policy", "explain", "-f", THREE_TIER, "--from", "web", "--to", FRONTEND_A,
    ]);
    assert!(
        err.contains("--from") && err.contains("NAMESPACE/POD"),
        "{err}"
    );
}

#[test]
fn invalid_inputs_fail_naming_the_file_and_the_field() {
    let cases = [
        ("bad-yaml.yaml", "document 1: invalid YAML", "line 9"),
        (
            "endport.yaml",
            "document 2 (NetworkPolicy demo/port-range): spec.ingress[0].ports[0].endPort",
            "9000",
        ),
        (
            "bad-cidr.yaml",
            "(NetworkPolicy demo/from-office): spec.ingress[0].from[0].ipBlock.cidr",
            "10.0.0.0/33",
        ),
        (
            "except-outside.yaml",
            "(NetworkPolicy demo/egress-internet): spec.egress[0].to[0].ipBlock.except[1]",
            "192.168.0.0/24",
        ),
        (
            "bad-protocol.yaml",
            "(NetworkPolicy demo/ping): spec.ingress[0].ports[0].protocol",
            "ICMP",
        ),
        (
            "bad-type.yaml",
            "document 2 (NetworkPolicy demo/db): spec.ingress[0].ports[0].port",
            "invalid type",
        ),
    ];
    for (file, field, detail) in cases {
        let path = format!("tests/fixtures/invalid/{file}");
        for command in [
            vec!["policy", "matrix", "-f", &path],
            vec![
                "policy", "explain", "-f", &path, "--from", "a/b", "--to", "c/d",
            ],
        ] {
            let err = fails(&command);
            assert!(err.contains(&format!("{path}: ")), "{file}: {err}");
            assert!(err.contains(field), "{file}: {err}");
            assert!(err.contains(detail), "{file}: {err}");
        }
    }
}

#[test]
fn every_error_of_every_file_is_reported() {
    let err = fails(&[
        "policy",
        "matrix",
        "-f",
        "tests/fixtures/invalid/endport.yaml",
        "-f",
        "tests/fixtures/invalid/bad-cidr.yaml",
    ]);
    assert!(err.contains("2 errors"), "{err}");
    assert!(
        err.contains("endport.yaml") && err.contains("bad-cidr.yaml"),
        "{err}"
    );
}

#[test]
fn unreadable_paths_fail_naming_them() {
    let err = fails(&["policy", "matrix", "-f", "tests/fixtures/no-such-file.yaml"]);
    assert!(err.contains("tests/fixtures/no-such-file.yaml"), "{err}");
    let dir = scratch("binary-file");
    std::fs::write(dir.join("blob.yaml"), [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let err = fails(&["policy", "matrix", "-f", dir.to_str().unwrap()]);
    assert!(err.contains("blob.yaml") && err.contains("UTF-8"), "{err}");
    let empty = scratch("no-manifests");
    std::fs::write(empty.join("notes.txt"), "hello").unwrap();
    let err = fails(&["policy", "matrix", "-f", empty.to_str().unwrap()]);
    assert!(err.contains("no *.yaml"), "{err}");
}

#[test]
fn bad_probe_is_a_usage_error() {
    let run = tessera(&["policy", "matrix", "-f", THREE_TIER, "--probe", "80/ICMP"]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("80/ICMP"), "{}", run.stderr);
    let run = tessera(&["policy", "matrix", "-f", THREE_TIER, "--probe", "0"]);
    assert_eq!(run.code, Some(2));
}

#[test]
fn portless_protocols_are_probed_by_name_and_only_rules_without_ports_allow_them() {
    let doc: Value = serde_json::from_str(
        &ok(&[
            "policy", "matrix", "-f", THREE_TIER, "--probe", "ICMP", "--probe", "53/UDP", "-o",
            "json",
        ])
        .stdout,
    )
    .unwrap();
    let cells = doc["probes"].as_array().unwrap();
    let icmp: Vec<&Value> = cells.iter().filter(|c| c["protocol"] == "ICMP").collect();
    assert!(!icmp.is_empty(), "{doc}");
    assert!(icmp.iter().all(|c| c["port"] == 0), "{doc}");
    // Every rule of the three tiers names ports: nothing isolated receives ICMP.
    for c in icmp {
        if c["allowed"] == true {
            assert!(
                c["reason"].as_str().unwrap().contains("not isolated"),
                "only an unisolated destination takes ICMP: {c}"
            );
        }
    }
    assert!(
        cells
            .iter()
            .any(|c| c["protocol"] == "UDP" && c["port"] == 53)
    );
    let run = tessera(&["policy", "matrix", "-f", THREE_TIER, "--probe", "IP-17"]);
    assert_eq!(run.code, Some(2), "UDP has its own name");
    ok(&["policy", "matrix", "-f", THREE_TIER, "--probe", "IP-47"]);
}

#[test]
fn directories_are_read_recursively_and_other_kinds_skipped() {
    let run = ok(&[
        "policy",
        "matrix",
        "-f",
        "tests/fixtures/split",
        "-o",
        "json",
    ]);
    assert!(
        run.stderr
            .contains("skipped 1 object of other kinds (1 Service)"),
        "{}",
        run.stderr
    );
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    let allowed = |from: &str, to: &str, port: u16| {
        doc["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["from"] == from && c["to"] == to && c["port"] == port)
            .map(|c| c["allowed"].as_bool().unwrap())
    };
    // The policy (JSON, at the top) selects the monitoring namespace by a label that only its
    // Namespace object (YAML) carries, for the named port of a pod (YAML, in a subdirectory).
    assert_eq!(
        allowed("monitoring/prometheus-0", "shop/web-0", 8080),
        Some(true)
    );
    assert_eq!(allowed("shop/worker-0", "shop/web-0", 8080), Some(false));
    assert_eq!(
        allowed("shop/web-0", "monitoring/prometheus-0", 9090),
        Some(true)
    );
}

#[test]
fn one_bad_file_in_a_directory_fails_the_whole_run_naming_it() {
    let dir = scratch("one-bad-file");
    copy_dir(Path::new("tests/fixtures/split"), &dir.join("good"));
    std::fs::copy(
        "tests/fixtures/invalid/except-outside.yaml",
        dir.join("good/pods/zz-bad.yaml"),
    )
    .unwrap();
    let err = fails(&["policy", "matrix", "-f", dir.to_str().unwrap()]);
    assert!(err.contains("good/pods/zz-bad.yaml: document 1"), "{err}");
    assert!(err.contains("ipBlock.except[1]"), "{err}");
    // Only that one file is named.
    assert_eq!(err.matches("document").count(), 1, "{err}");
}

#[test]
fn pods_in_namespaces_missing_from_the_input_still_load() {
    let dir = scratch("no-namespaces");
    let file = dir.join("pods.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: solo, labels: {x: y}}\nspec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\nstatus: {podIP: 10.9.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: solo}\nspec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\nstatus: {podIP: 10.9.0.2}\n",
    )
    .unwrap();
    let run = ok(&["policy", "matrix", "-f", file.to_str().unwrap()]);
    assert!(
        run.stderr.contains("namespace solo not in the input"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("solo/a"), "{}", run.stdout);
}

#[test]
fn reads_kubectl_output_from_standard_input() {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "policy", "matrix", "-f", "-", "--probe", "80/TCP", "-o", "json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let text = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(THREE_TIER)).unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["probes"].as_array().unwrap().len(), 9 * 8);

    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["policy", "matrix", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: 3}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("<stdin>: document 1 (Pod default/a): spec.containers: "),
        "{err}"
    );
}

#[test]
fn the_example_walkthrough_shows_what_the_binary_prints() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy-matrix");
    let readme = std::fs::read_to_string(example.join("README.md")).unwrap();
    let commands: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("$ tessera "))
        .filter(|c| !c.contains('|') && !c.contains('>'))
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    for command in commands {
        let args: Vec<&str> = command.split_whitespace().collect();
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(&args)
            .current_dir(&example)
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        // Long JSON is shown cut after its first 20 lines.
        let shown: Vec<&str> = stdout.lines().take(20).collect();
        let stale = |what: &str| {
            format!(
                "examples/policy-matrix/README.md is out of date for `tessera {command}`: {what}; now:\n{stdout}{stderr}"
            )
        };
        assert!(readme.contains(&shown.join("\n")), "{}", stale("stdout"));
        for line in stderr.lines() {
            assert!(readme.contains(line), "{}", stale("stderr"));
        }
        let code = out.status.code().unwrap();
        let says_failure = readme.contains(&format!(
            "$ tessera {command}\n{}\n$ echo $?\n2",
            stderr.trim_end()
        ));
        assert_eq!(code == 2, says_failure, "{}", stale("exit status"));
    }
}

#[test]
fn a_changed_policy_given_after_the_dump_replaces_the_old_one() {
    // What-if: open the database to the frontend, before applying it to the cluster.
    let dir = scratch("what-if");
    let change = dir.join("database-change.yaml");
    std::fs::write(
        &change,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: database, namespace: demo}\nspec:\n  podSelector: {matchLabels: {role: Database}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: WebFrontend}}}]\n",
    )
    .unwrap();
    let before = json_matrix(&["-f", THREE_TIER, "--probe", "5432"]);
    assert_cells(&before, "5432/TCP", &[(FRONTEND_A, DATABASE_0, false)]);
    let run = ok(&[
        "policy",
        "matrix",
        "-o",
        "json",
        "-f",
        THREE_TIER,
        "-f",
        change.to_str().unwrap(),
        "--probe",
        "5432",
    ]);
    assert!(
        run.stderr.contains(&format!(
            "NetworkPolicy demo/database from {}: document 1 replaces the one from {THREE_TIER}: document 1, items[15]",
            change.display()
        )),
        "{}",
        run.stderr
    );
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    let cell = |from: &str, to: &str| {
        doc["probes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["from"] == from && c["to"] == to)
            .map(|c| c["allowed"].as_bool().unwrap())
    };
    assert_eq!(cell(FRONTEND_A, DATABASE_0), Some(true));
    // The new version replaced the old one whole: the backend and the other replica lost access.
    assert_eq!(cell(DATABASE_1, DATABASE_0), Some(false));
    assert_eq!(cell(BACKEND_A, DATABASE_0), Some(false));
}

#[test]
fn a_reader_that_stops_early_ends_the_output_quietly() {
    use std::process::Stdio;
    let dir = scratch("broken-pipe");
    let input = thirty_pods(&dir);
    // 870 cells of JSON: far more than a pipe holds, so the writer meets the closed pipe.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["policy", "matrix", "-o", "json", "-f"])
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_input_without_connections_says_why() {
    let dir = scratch("nothing-to-show");
    let policies = dir.join("policies-only.yaml");
    std::fs::copy("tests/fixtures/split/policies.json", &policies).unwrap();
    let run = ok(&["policy", "matrix", "-f", policies.to_str().unwrap()]);
    assert!(
        run.stdout
            .contains("nothing to show: the input has no pods"),
        "{}",
        run.stdout
    );
    let run = ok(&[
        "policy",
        "matrix",
        "-f",
        "tests/fixtures/split/pods/monitoring.yaml",
        "--probe",
        "80",
    ]);
    assert!(
        run.stdout
            .contains("nothing to show: 1 pod and no --from-ip"),
        "{}",
        run.stdout
    );
}

/// A staged policy is not evaluated by the plain matrix; `--staged` prints exactly the cells it
/// would flip, with both reasons (table and JSON), and a staged copy of an enforced policy
/// replaces it in the staged view. Without any staged policy, `--staged` says how to stage one.
#[test]
fn staged_policies_show_the_cells_they_would_flip() {
    let dir = scratch("staged");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier/kubernetes"),
        &dir,
    );
    let d = dir.to_str().unwrap();
    let before = json_matrix(&["-f", d]);
    let err = fails(&["policy", "matrix", "--staged", "-f", d]);
    assert!(
        err.contains("no staged policy") && err.contains("tessera.dev/staged"),
        "{err}"
    );

    // Stage a replacement of the backend policy that drops the frontends.
    let backend = std::fs::read_to_string(dir.join("32-policy-backend.yaml")).unwrap();
    assert!(backend.contains("role: WebFrontend"), "{backend}");
    let staged = backend
        .replace("role: WebFrontend", "role: Nobody")
        .replace(
            "metadata: {name: backend, namespace: demo}",
            "metadata:\n  name: backend\n  namespace: demo\n  annotations: {tessera.dev/staged: \"true\"}",
        );
    assert!(staged.contains("tessera.dev/staged"), "{staged}");
    std::fs::write(dir.join("99-staged-backend.yaml"), staged).unwrap();

    let plain = tessera(&["policy", "matrix", "-o", "json", "-f", d]);
    assert_eq!(plain.code, Some(0), "{}", plain.stderr);
    assert!(
        plain.stderr.contains("1 staged policy not enforced"),
        "{}",
        plain.stderr
    );
    assert_eq!(
        json_matrix(&["-f", d]),
        before,
        "a staged policy changed enforcement"
    );

    let table = ok(&["policy", "matrix", "--staged", "-f", d]);
    assert!(
        table
            .stdout
            .starts_with("staged policies (NetworkPolicy demo/backend) would flip 1 of "),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .contains("demo/frontend -> demo/backend 8080/TCP: allowed -> DENIED"),
        "{}",
        table.stdout
    );
    let json: Value =
        serde_json::from_str(&ok(&["policy", "matrix", "--staged", "-o", "json", "-f", d]).stdout)
            .unwrap();
    let flips = json["flips"].as_array().unwrap();
    assert_eq!(flips.len(), 1, "{json}");
    assert_eq!(flips[0]["from"], "demo/frontend");
    assert_eq!(flips[0]["enforced"]["allowed"], true);
    assert_eq!(flips[0]["staged"]["allowed"], false);
    assert!(
        flips[0]["enforced"]["reason"]
            .as_str()
            .unwrap()
            .contains("allowed by demo/backend"),
        "{json}"
    );
}
