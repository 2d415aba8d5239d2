//! `tessera policy matrix --output dot|html`, run as the real binary: the DOT against a golden
//! file and read back by Graphviz, the page opened in headless Chromium and its screenshot read
//! cell by cell. Graphviz (`dot`) and Chromium come from Debian: tests/run.sh installs them with
//! tests/need.sh; without them these tests print a SKIP line locally and fail under CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Two namespaces, three pods, a NetworkPolicy and an Admin-tier ClusterNetworkPolicy.
const SHOP: &str = "tests/fixtures/picture/shop.yaml";
const SHOP_DOT: &str = "tests/fixtures/picture/shop.dot";
const SHOP_ARGS: [&str; 8] = [
    "--probe",
    "80",
    "--probe",
    "5432",
    "--from-ip",
    "198.51.100.7",
    "-f",
    SHOP,
];
const THREE_TIER: &str = "tests/fixtures/three-tier.yaml";

/// What each cell of shop.yaml is (`S` the pod itself, `A` allowed, `D` denied), per probe in
/// order, rows (sources) and columns (destinations) in the matrix's order: ops/probe, shop/db,
/// shop/web, then the IP source as the last row.
const SHOP_GRID: [(&str, [&str; 4]); 2] = [
    ("80/TCP", ["SDD", "ASA", "ADS", "ADA"]),
    ("5432/TCP", ["SDD", "ASA", "AAS", "ADA"]),
];
const SHOP_SOURCES: [&str; 4] = ["ops/probe", "shop/db", "shop/web", "198.51.100.7"];
const SHOP_PODS: [&str; 3] = ["ops/probe", "shop/db", "shop/web"];

fn tessera(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "tessera {args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn matrix(output: &str, args: &[&str]) -> String {
    let mut all = vec!["policy", "matrix", "--output", output];
    all.extend_from_slice(args);
    tessera(&all)
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `(from, to, "port/protocol") -> allowed`, from `-o json`.
fn json_cells(args: &[&str]) -> BTreeMap<(String, String, String), bool> {
    let doc: Value = serde_json::from_str(&matrix("json", args)).unwrap();
    doc["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                (
                    c["from"].as_str().unwrap().to_owned(),
                    c["to"].as_str().unwrap().to_owned(),
                    format!("{}/{}", c["port"], c["protocol"].as_str().unwrap()),
                ),
                c["allowed"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Runs `program` with `args`, its output to files in `dir`, killed after `timeout`.
fn run_with_timeout(program: &str, args: &[String], dir: &Path, timeout: Duration) -> Output {
    let stdout = dir.join(format!("{program}.stdout"));
    let stderr = dir.join(format!("{program}.stderr"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} {args:?} still running after {timeout:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&stdout).unwrap(),
        stderr: std::fs::read(&stderr).unwrap(),
    }
}

// --- DOT -------------------------------------------------------------------------------------

#[test]
fn dot_of_a_small_cluster_is_the_golden_file_every_time() {
    let dot = matrix("dot", &SHOP_ARGS);
    if std::env::var_os("TESSERA_BLESS").is_some() {
        std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join(SHOP_DOT), &dot).unwrap();
    }
    let golden =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(SHOP_DOT)).unwrap();
    assert_eq!(
        dot, golden,
        "differs from {SHOP_DOT} (TESSERA_BLESS=1 rewrites it); now:\n{dot}"
    );
    assert_eq!(matrix("dot", &SHOP_ARGS), dot, "not deterministic");
    // The probes of one pair share one arrow; denied pairs have none.
    assert!(
        dot.contains("\"pod:shop/web\" -> \"pod:shop/db\" [label=\"5432/TCP\"];"),
        "{dot}"
    );
    assert!(
        dot.contains("\"pod:shop/db\" -> \"pod:shop/web\" [label=\"80/TCP, 5432/TCP\"];"),
        "{dot}"
    );
    assert!(!dot.contains("\"pod:ops/probe\" ->"), "{dot}");
}

/// Runs `dot -Tsvg` on `text`, expecting it to succeed without a warning; returns the SVG.
fn graphviz(test: &str, text: &str) -> Option<String> {
    if !testbed::have_command(test, "dot", "graphviz") {
        return None;
    }
    let dir = scratch(test);
    let input = dir.join("matrix.dot");
    std::fs::write(&input, text).unwrap();
    let out = run_with_timeout(
        "dot",
        &["-Tsvg".to_owned(), input.display().to_string()],
        &dir,
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dot -Tsvg failed: {stderr}\n{text}");
    assert!(stderr.is_empty(), "dot -Tsvg warned: {stderr}\n{text}");
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn graphviz_draws_a_cluster_per_namespace_a_node_per_pod_and_an_arrow_per_allowed_pair() {
    let args = [
        "-f",
        THREE_TIER,
        "--probe",
        "80",
        "--probe",
        "8080",
        "--probe",
        "53/UDP",
        "--from-ip",
        "192.0.2.1",
    ];
    let dot = matrix("dot", &args);
    let Some(svg) = graphviz("picture_graphviz_three_tier", &dot) else {
        return;
    };
    let cells = json_cells(&args);
    let pairs: std::collections::BTreeSet<(&str, &str)> = cells
        .iter()
        .filter(|(_, allowed)| **allowed)
        .map(|((from, to, _), _)| (from.as_str(), to.as_str()))
        .collect();
    assert!(pairs.len() > 5, "{pairs:?}");
    assert_eq!(
        svg.matches("class=\"cluster\"").count(),
        2,
        "demo, kube-system"
    );
    assert_eq!(svg.matches("class=\"node\"").count(), 10, "9 pods, 1 IP");
    assert_eq!(svg.matches("class=\"edge\"").count(), pairs.len());
}

// --- HTML ------------------------------------------------------------------------------------

/// No script, stylesheet, image, font or link: the page needs nothing but itself.
fn assert_self_contained(page: &str) {
    let lower = page.to_ascii_lowercase();
    for needle in [
        "<script",
        "<link",
        "<img",
        "<iframe",
        "<object",
        "<embed",
        "src=",
        "href=",
        "url(",
        "@import",
        "@font-face",
        "://",
    ] {
        assert!(!lower.contains(needle), "the page holds {needle}:\n{page}");
    }
}

#[test]
fn html_is_one_self_contained_deterministic_page_that_says_why_on_hover() {
    let page = matrix("html", &SHOP_ARGS);
    assert_eq!(matrix("html", &SHOP_ARGS), page, "not deterministic");
    assert_self_contained(&page);
    assert!(page.starts_with("<!DOCTYPE html>\n"), "{page}");
    assert!(
        page.contains("<code>tests/fixtures/picture/shop.yaml</code>"),
        "{page}"
    );
    assert!(
        page.contains("Probes (--probe): every pod on 80/TCP, 5432/TCP."),
        "{page}"
    );
    assert!(page.contains("<h2>80/TCP <small>5 allowed, 4 denied</small></h2>"));
    assert!(page.contains("<h2>5432/TCP <small>6 allowed, 3 denied</small></h2>"));
    // What decided, each direction: the admin tier's rule, a NetworkPolicy, the default.
    for title in [
        "ops/probe → shop/web on 80/TCP: denied&#10;\
         egress of ops/probe: allowed: not isolated for egress (no policy selects it)&#10;\
         ingress of shop/web: denied by Admin ClusterNetworkPolicy/no-ops-in-shop (priority 10) ingress rule 0 (Deny)",
        "shop/web → shop/db on 5432/TCP: allowed&#10;\
         egress of shop/web: allowed: not isolated for egress (no policy selects it)&#10;\
         ingress of shop/db: allowed by shop/db ingress rule 0",
        "198.51.100.7 → shop/db on 80/TCP: denied&#10;\
         egress of 198.51.100.7: not enforced (an IP-only source: no agent decides)&#10;\
         ingress of shop/db: denied: isolated for ingress by shop/db (no rule matches)",
    ] {
        assert!(
            page.contains(&format!("title=\"{title}\"")),
            "{title}\n{page}"
        );
    }
}

#[test]
fn html_of_nothing_says_why() {
    let page = matrix("html", &["-f", "tests/fixtures/split/policies.json"]);
    assert!(
        page.contains("<p class=\"empty\">Nothing to show: the input has no pods</p>"),
        "{page}"
    );
    assert!(!page.contains("<table"), "{page}");
}

// --- in Chromium -------------------------------------------------------------------------------

/// Runs headless Chromium on `page` with `args` (a screenshot, a DOM dump), as the machine
/// allows it: as root without its sandbox, no GPU, none of its background connections.
fn chromium(dir: &Path, page: &Path, args: &[&str]) -> Output {
    let mut all: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--force-color-profile=srgb",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    all.push(format!("--user-data-dir={}", dir.join("profile").display()));
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all.push(format!("file://{}", page.display()));
    let out = run_with_timeout("chromium", &all, dir, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "chromium {all:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Colour {
    Allowed,
    Denied,
    Itself,
}

impl Colour {
    /// The page's fills: allowed `#2e7d32`, denied `#c62828`, the pod itself `#bdbdbd`.
    fn of(pixel: [u8; 3]) -> Option<Colour> {
        let near = |rgb: [u8; 3]| pixel.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 6);
        if near([0x2e, 0x7d, 0x32]) {
            Some(Colour::Allowed)
        } else if near([0xc6, 0x28, 0x28]) {
            Some(Colour::Denied)
        } else if near([0xbd, 0xbd, 0xbd]) {
            Some(Colour::Itself)
        } else {
            None
        }
    }

    fn letter(self) -> char {
        match self {
            Colour::Allowed => 'A',
            Colour::Denied => 'D',
            Colour::Itself => 'S',
        }
    }
}

/// A patch of one colour on the screenshot.
#[derive(Debug)]
struct Blob {
    colour: Colour,
    left: usize,
    top: usize,
    width: usize,
    height: usize,
    pixels: usize,
}

/// An RGB image, row-major.
struct Picture {
    width: usize,
    height: usize,
    rgb: Vec<[u8; 3]>,
}

fn decode_png(path: &Path) -> Picture {
    let mut decoder =
        png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let rgb = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    Picture {
        width: info.width as usize,
        height: info.height as usize,
        rgb,
    }
}

/// The connected patches (4-neighbours) of each of the page's fill colours.
fn blobs(picture: &Picture) -> Vec<Blob> {
    let colours: Vec<Option<Colour>> = picture.rgb.iter().map(|p| Colour::of(*p)).collect();
    let mut seen = vec![false; colours.len()];
    let mut found = Vec::new();
    for start in 0..colours.len() {
        let Some(colour) = colours[start] else {
            continue;
        };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let (mut x0, mut y0, mut x1, mut y1, mut pixels) = (usize::MAX, usize::MAX, 0, 0, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % picture.width, i / picture.width);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            pixels += 1;
            let mut next = Vec::with_capacity(4);
            if x > 0 {
                next.push(i - 1);
            }
            if x + 1 < picture.width {
                next.push(i + 1);
            }
            if y > 0 {
                next.push(i - picture.width);
            }
            if y + 1 < picture.height {
                next.push(i + picture.width);
            }
            for n in next {
                if !seen[n] && colours[n] == Some(colour) {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
        found.push(Blob {
            colour,
            left: x0,
            top: y0,
            width: x1 - x0 + 1,
            height: y1 - y0 + 1,
            pixels,
        });
    }
    found
}

/// The grid cells seen on the picture: solid squares of about 20 pixels (the legend's swatches
/// are 12), as rows of letters (see [`SHOP_GRID`]) from top to bottom, each left to right.
fn cells_seen(picture: &Picture) -> Vec<String> {
    let mut cells: Vec<Blob> = blobs(picture)
        .into_iter()
        .filter(|b| {
            (18..=22).contains(&b.width)
                && (18..=22).contains(&b.height)
                && b.pixels * 10 >= b.width * b.height * 9
        })
        .collect();
    cells.sort_by_key(|b| (b.top, b.left));
    let mut rows: Vec<Vec<&Blob>> = Vec::new();
    for cell in &cells {
        match rows.last_mut() {
            Some(row) if row[0].top.abs_diff(cell.top) <= 3 => row.push(cell),
            _ => rows.push(vec![cell]),
        }
    }
    rows.iter()
        .map(|row| {
            let mut row = row.clone();
            row.sort_by_key(|b| b.left);
            row.iter().map(|b| b.colour.letter()).collect()
        })
        .collect()
}

#[test]
fn chromium_shows_every_cell_of_the_matrix_in_its_colour() {
    if !testbed::have_command("picture_chromium_screenshot", "chromium", "chromium") {
        return;
    }
    // The expected grid is the matrix's: check the fixture means what SHOP_GRID says.
    let cells = json_cells(&SHOP_ARGS);
    let mut expected = Vec::new();
    for (probe, rows) in SHOP_GRID {
        for (from, row) in SHOP_SOURCES.iter().zip(rows) {
            for (to, mark) in SHOP_PODS.iter().zip(row.chars()) {
                let key = ((*from).to_owned(), (*to).to_owned(), probe.to_owned());
                let allowed = cells.get(&key).copied();
                let want = match mark {
                    'S' => None,
                    m => Some(m == 'A'),
                };
                assert_eq!(allowed, want, "{from} -> {to} on {probe}");
            }
            expected.push(row.to_owned());
        }
    }

    let dir = scratch("picture_chromium_screenshot");
    let page = dir.join("matrix.html");
    std::fs::write(&page, matrix("html", &SHOP_ARGS)).unwrap();
    let png = dir.join("matrix.png");
    chromium(
        &dir,
        &page,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=900,1200",
        ],
    );
    let picture = decode_png(&png);
    assert_eq!((picture.width, picture.height), (900, 1200));
    let seen = cells_seen(&picture);
    assert_eq!(
        seen,
        expected,
        "the grids on the screenshot ({}), rows top to bottom, S itself, A allowed, D denied",
        png.display()
    );
    let count = |c: char| seen.concat().matches(c).count();
    let allowed = cells.values().filter(|a| **a).count();
    assert_eq!(
        (count('A'), count('D')),
        (allowed, cells.len() - allowed),
        "green and red cells against the matrix's allowed and denied"
    );
}

#[test]
fn a_hostile_file_name_stays_text_in_chromium() {
    if !testbed::have_command("picture_chromium_hostile", "chromium", "chromium") {
        return;
    }
    let dir = scratch("picture_chromium_hostile");
    // Taken whatever its name: a file given to -f is read as a manifest.
    let input = dir.join("shop\"><b id=\"x\">bold<!--'&amp;\nline.yaml");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join(SHOP), &input).unwrap();
    let html = matrix("html", &["-f", input.to_str().unwrap(), "--probe", "80"]);
    assert_self_contained(&html);
    let page = dir.join("matrix.html");
    std::fs::write(&page, &html).unwrap();
    let out = chromium(&dir, &page, &["--dump-dom"]);
    let dom = String::from_utf8(out.stdout).unwrap();
    // The name is the text of its <code>, escaped again by the DOM's serializer; no element
    // or comment came out of it.
    assert!(
        dom.contains(&format!(
            "<code>{}</code>",
            input
                .display()
                .to_string()
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        )),
        "{dom}"
    );
    assert!(!dom.contains("<b id"), "{dom}");
    assert!(!dom.contains("<!--"), "{dom}");
    assert!(dom.contains("<footer>"), "the page ends as written:\n{dom}");
}
