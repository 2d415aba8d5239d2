//! `tessera policy matrix -o dot|html`: the matrix as a picture.
//!
//! [`dot`] and [`html`] take a computed [`Matrix`] (the page also a few words about where it came
//! from, [`About`]) and return the whole document: they know nothing of flags or files, so any
//! way of building a matrix renders the same. Each first gathers what it draws into a plain model
//! ([`Graph`], [`Page`]) and then writes that model, escaping every piece of text on the way out:
//! names and labels come from the input. The loader refuses label values and names with quotes,
//! backslashes or newlines, as the API server does, but the writers do not count on it.
//!
//! Both are deterministic: the matrix is ordered (pods by key, IP sources sorted, probes sorted)
//! and nothing else, no clock, goes in.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use policy::matrix::{CellRef, Matrix, Probe, Source};
use policy::{Direction, PodKey, Workload};

/// Labels a controller gives each replica a different value of: noise on a picture.
const REPLICA_LABELS: [&str; 7] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
];

/// At most this many labels on a node; more are counted.
const MAX_LABELS: usize = 4;

/// A workload's labels worth drawing, as `key=value` lines (those telling replicas apart left
/// out; past [`MAX_LABELS`] a count of the rest).
fn key_labels(w: &Workload) -> Vec<String> {
    let mut shown: Vec<String> = w
        .labels
        .iter()
        .filter(|(k, _)| !REPLICA_LABELS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if shown.len() > MAX_LABELS {
        let more = shown.len() - (MAX_LABELS - 1);
        shown.truncate(MAX_LABELS - 1);
        shown.push(format!("+{more} more labels"));
    }
    shown
}

// --- DOT -------------------------------------------------------------------------------------

/// Graphviz DOT: a cluster per namespace holding a node per pod (its name and key labels), a node
/// per IP-only source outside them, and an arrow per source and destination that may connect on
/// at least one probe, labelled with those probes (`80/TCP, 8080/TCP`). Denied pairs draw nothing.
pub fn dot(matrix: &Matrix<'_>) -> String {
    Graph::of(matrix).write()
}

/// What [`dot`] draws, before it is written.
struct Graph {
    /// Per namespace, sorted: its pods, in key order.
    clusters: BTreeMap<String, Vec<Node>>,
    /// The IP-only sources, sorted.
    outside: Vec<Node>,
    /// One per allowed (source, destination), by source then destination.
    edges: Vec<Edge>,
}

struct Node {
    /// Never shown: the label is.
    id: String,
    /// The label, a line each.
    lines: Vec<String>,
    ip_only: bool,
}

struct Edge {
    from: String,
    to: String,
    /// The probes this pair is allowed on, in probe order.
    probes: Vec<String>,
}

fn pod_id(key: &PodKey) -> String {
    format!("pod:{key}")
}

fn source_id(source: &Source) -> String {
    match source {
        Source::Pod(key) => pod_id(key),
        Source::Ip(ip) => format!("ip:{ip}"),
    }
}

impl Graph {
    fn of(matrix: &Matrix<'_>) -> Graph {
        let mut clusters: BTreeMap<String, Vec<Node>> = BTreeMap::new();
        for w in matrix.workloads() {
            let mut lines = vec![w.key.name.clone()];
            if w.host_network {
                lines.push("host network".to_owned());
            }
            lines.extend(key_labels(w));
            clusters
                .entry(w.key.namespace.clone())
                .or_default()
                .push(Node {
                    id: pod_id(&w.key),
                    lines,
                    ip_only: false,
                });
        }
        let outside = matrix
            .sources()
            .iter()
            .filter_map(|s| match s {
                Source::Ip(ip) => Some(Node {
                    id: source_id(s),
                    lines: vec![ip.to_string(), "IP only".to_owned()],
                    ip_only: true,
                }),
                Source::Pod(_) => None,
            })
            .collect();
        // Cells come by probe, and the probes are sorted: each pair's list is in probe order.
        let mut pairs: BTreeMap<(usize, usize), Vec<Probe>> = BTreeMap::new();
        for cell in matrix.cells().filter(|c| c.verdict.allowed) {
            pairs
                .entry((cell.row, cell.column))
                .or_default()
                .push(cell.probe);
        }
        let destinations: Vec<&PodKey> = matrix.destinations().collect();
        let edges = pairs
            .into_iter()
            .filter_map(|((row, column), probes)| {
                Some(Edge {
                    from: source_id(matrix.sources().get(row)?),
                    to: pod_id(destinations.get(column)?),
                    probes: probes.iter().map(ToString::to_string).collect(),
                })
            })
            .collect();
        Graph {
            clusters,
            outside,
            edges,
        }
    }

    fn write(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "// tessera policy matrix: an arrow for each source that may reach a destination, labelled with the ports it may use\n",
        );
        out.push_str("digraph \"policy matrix\" {\n");
        let _ = writeln!(
            out,
            "  graph [rankdir=LR, fontname=\"sans-serif\", labelloc=b, label={}];",
            quoted("arrows: allowed connections, source to destination, with their ports")
        );
        out.push_str("  node [shape=box, style=rounded, fontname=\"sans-serif\", fontsize=11];\n");
        out.push_str("  edge [fontname=\"sans-serif\", fontsize=9, color=\"#2e7d32\"];\n");
        for (i, (namespace, nodes)) in self.clusters.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "  subgraph {} {{\n    label={};\n    style=rounded;",
                quoted(&format!("cluster_{namespace}")),
                quoted(&format!("namespace {namespace}"))
            );
            for node in nodes {
                out.push_str("    ");
                node.write(&mut out);
            }
            out.push_str("  }\n");
        }
        if !self.outside.is_empty() {
            out.push('\n');
        }
        for node in &self.outside {
            out.push_str("  ");
            node.write(&mut out);
        }
        if !self.edges.is_empty() {
            out.push('\n');
        }
        for edge in &self.edges {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                quoted(&edge.from),
                quoted(&edge.to),
                quoted(&edge.probes.join(", "))
            );
        }
        out.push_str("}\n");
        out
    }
}

impl Node {
    fn write(&self, out: &mut String) {
        let _ = write!(
            out,
            "{} [label={}",
            quoted(&self.id),
            quoted(&self.lines.join("\n"))
        );
        if self.ip_only {
            out.push_str(", shape=ellipse, style=dashed");
        }
        out.push_str("];\n");
    }
}

/// `text` as a double-quoted DOT string (an identifier or a label) that reads back as `text`:
/// `"` and `\` escaped (so no `\N`, `\l`... sequence can arise from the text), a line break as
/// `\n` (a centred line in a label), `&` as `&amp;` (Graphviz reads HTML entities in every
/// string: `&lt;` would show as `<`), and any other control character as U+FFFD (it has no
/// place in the SVG Graphviz writes).
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '&' => out.push_str("&amp;"),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// --- HTML ------------------------------------------------------------------------------------

/// Where a page's matrix came from, written on the page as given.
#[derive(Default)]
pub struct About {
    /// The files read, in order (`<stdin>` for standard input).
    pub inputs: Vec<String>,
    /// Sentences on how the matrix was made (which probes, which extra sources).
    pub notes: Vec<String>,
    /// Why the matrix has no cell, shown instead of the grids when it has none.
    pub empty: String,
}

/// One self-contained HTML page (inline CSS, no script, no external reference): per probe a
/// grid with a row per source and a column per destination, allowed cells green, denied red, a
/// pod against itself grey, each cell's `title` saying what decided each direction; a legend,
/// the input files and a note on how it was made.
///
/// Every cell is a 20 by 20 pixel square, 2 pixels apart, so a grid can be measured on a
/// screenshot.
pub fn html(matrix: &Matrix<'_>, about: &About) -> String {
    Page::of(matrix, about).write()
}

/// What [`html`] shows, before it is written.
struct Page<'a> {
    about: &'a About,
    /// No cell at all: [`About::empty`] says why.
    empty: bool,
    blocks: Vec<Block>,
}

/// One probe's grid.
struct Block {
    probe: String,
    columns: Vec<String>,
    rows: Vec<Row>,
}

struct Row {
    name: String,
    cells: Vec<Mark>,
}

/// A cell, with what its `title` says.
enum Mark {
    Allowed(String),
    Denied(String),
    /// A pod against itself: not probed.
    Itself(String),
}

/// `1 demo/api-1`: a pod, numbered as in the text table.
fn numbered(position: usize, key: &PodKey) -> String {
    format!("{} {key}", position + 1)
}

/// A row's heading: the numbered pod, or the address of an IP source.
fn heading(position: usize, source: &Source) -> String {
    match source {
        Source::Pod(key) => numbered(position, key),
        Source::Ip(ip) => ip.to_string(),
    }
}

/// `from → to on 80/TCP: denied`, then what decided each direction, a line each, in the words
/// of `tessera policy explain`.
fn cell_title(cell: &CellRef<'_>) -> String {
    let verdict = cell.verdict.to_verdict();
    let mut title = format!(
        "{} → {} on {}: {}\negress of {}: ",
        cell.from,
        cell.to,
        cell.probe,
        if verdict.allowed { "allowed" } else { "denied" },
        cell.from,
    );
    let _ = match (&verdict.egress, cell.from) {
        (Some(decision), _) => write!(title, "{}", decision.in_direction(Direction::Egress)),
        (None, Source::Ip(_)) => {
            write!(title, "not enforced (an IP-only source: no agent decides)")
        }
        (None, Source::Pod(_)) => write!(title, "not enforced (host network pod)"),
    };
    let _ = write!(
        title,
        "\ningress of {}: {}",
        cell.to,
        verdict.ingress.in_direction(Direction::Ingress)
    );
    title
}

impl<'a> Page<'a> {
    fn of(matrix: &Matrix<'_>, about: &'a About) -> Page<'a> {
        let sources = matrix.sources();
        let destinations: Vec<&PodKey> = matrix.destinations().collect();
        let mut blocks = Vec::new();
        for (p, probe) in matrix.probes().iter().enumerate() {
            let columns = matrix.columns(p);
            let mut slot_of = vec![usize::MAX; destinations.len()];
            for (slot, column) in columns.iter().enumerate() {
                if let Some(s) = slot_of.get_mut(*column) {
                    *s = slot;
                }
            }
            let mut grid: Vec<Vec<Option<Mark>>> = sources
                .iter()
                .map(|_| columns.iter().map(|_| None).collect())
                .collect();
            for cell in matrix.probe_cells(p) {
                let slot = slot_of.get(cell.column).copied().unwrap_or(usize::MAX);
                if let Some(m) = grid.get_mut(cell.row).and_then(|r| r.get_mut(slot)) {
                    let title = cell_title(&cell);
                    *m = Some(if cell.verdict.allowed {
                        Mark::Allowed(title)
                    } else {
                        Mark::Denied(title)
                    });
                }
            }
            let rows = sources
                .iter()
                .zip(grid)
                .enumerate()
                .map(|(row, (source, marks))| Row {
                    name: heading(row, source),
                    cells: marks
                        .into_iter()
                        .map(|m| {
                            m.unwrap_or_else(|| {
                                Mark::Itself(format!("{source}: the pod itself, not probed"))
                            })
                        })
                        .collect(),
                })
                .collect();
            blocks.push(Block {
                probe: probe.to_string(),
                columns: columns
                    .iter()
                    .filter_map(|c| Some(numbered(*c, destinations.get(*c)?)))
                    .collect(),
                rows,
            });
        }
        Page {
            about,
            empty: matrix.is_empty(),
            blocks,
        }
    }

    fn write(&self) -> String {
        let mut out = String::new();
        out.push_str(concat!(
            "<!DOCTYPE html>\n",
            "<html lang=\"en\">\n",
            "<head>\n",
            "<meta charset=\"utf-8\">\n",
            "<title>tessera policy matrix</title>\n",
            "<style>\n",
            include_str!("picture.css"),
            "</style>\n",
            "</head>\n",
            "<body>\n",
            "<h1>Policy matrix</h1>\n",
            "<p>Which source may open a connection to which destination, per port and protocol: \
             allowed when the egress of the source and the ingress of the destination both \
             allow it. Rows are sources, columns destinations. Hover over a cell for what \
             decided each direction: a policy and its rule or tier, or the default.</p>\n",
            "<ul class=\"legend\">\n",
            "<li><span class=\"swatch allow\"></span>allowed</li>\n",
            "<li><span class=\"swatch deny\"></span>denied</li>\n",
            "<li><span class=\"swatch self\"></span>the pod itself (not probed)</li>\n",
            "</ul>\n",
        ));
        out.push_str("<p class=\"inputs\">Input: ");
        for (i, input) in self.about.inputs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "<code>{}</code>", escape(input));
        }
        out.push_str("</p>\n");
        for note in &self.about.notes {
            let _ = writeln!(out, "<p class=\"note\">{}</p>", escape(note));
        }
        if self.empty {
            let _ = writeln!(
                out,
                "<p class=\"empty\">Nothing to show: {}</p>",
                escape(&self.about.empty)
            );
        } else {
            for block in &self.blocks {
                block.write(&mut out);
            }
        }
        let _ = writeln!(
            out,
            "<footer>Generated by tessera {} (<code>tessera policy matrix --output html</code>), \
             offline from the input alone: what the policies say, not what a running agent \
             enforces.</footer>",
            escape(env!("CARGO_PKG_VERSION"))
        );
        out.push_str("</body>\n</html>\n");
        out
    }
}

impl Block {
    fn write(&self, out: &mut String) {
        let count = |allowed: bool| {
            self.rows
                .iter()
                .flat_map(|r| &r.cells)
                .filter(|m| match m {
                    Mark::Allowed(_) => allowed,
                    Mark::Denied(_) => !allowed,
                    Mark::Itself(_) => false,
                })
                .count()
        };
        let _ = writeln!(
            out,
            "<section>\n<h2>{} <small>{} allowed, {} denied</small></h2>",
            escape(&self.probe),
            count(true),
            count(false)
        );
        out.push_str("<table class=\"grid\">\n<thead><tr><th class=\"corner\">from ↓ to →</th>");
        for column in &self.columns {
            let _ = write!(
                out,
                "<th class=\"col\" scope=\"col\"><span>{}</span></th>",
                escape(column)
            );
        }
        out.push_str("</tr></thead>\n<tbody>\n");
        for row in &self.rows {
            let _ = write!(
                out,
                "<tr><th class=\"row\" scope=\"row\">{}</th>",
                escape(&row.name)
            );
            for mark in &row.cells {
                let (class, title) = match mark {
                    Mark::Allowed(t) => ("allow", t),
                    Mark::Denied(t) => ("deny", t),
                    Mark::Itself(t) => ("self", t),
                };
                let _ = write!(
                    out,
                    "<td class=\"{class}\" title=\"{}\"></td>",
                    escape(title)
                );
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody>\n</table>\n</section>\n");
    }
}

/// `text` safe in HTML text and in a double- or single-quoted attribute; a line break as `&#10;`
/// (a line of its own in a tooltip) and any other control character as U+FFFD.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("&#10;"),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    use std::io::Write as _;
    use std::process::{Command, Stdio};

    /// Everything that could end a string, start a statement or an escape, or open markup.
    const HOSTILE: &str = "x\"} -> evil [label=\"pwned\"]; \\N\\l\n<b>&lt;it's\u{1}\\";

    #[test]
    fn dot_strings_escape_quotes_backslashes_line_breaks_and_entities() {
        assert_eq!(quoted("demo/web-1"), "\"demo/web-1\"");
        assert_eq!(
            quoted("a\"b\\c\nd&lt;\u{7}"),
            "\"a\\\"b\\\\c\\nd&amp;lt;\u{FFFD}\""
        );
        // A trailing backslash does not escape the closing quote.
        assert_eq!(quoted("a\\"), "\"a\\\\\"");
    }

    #[test]
    fn html_text_escapes_markup_quotes_and_line_breaks() {
        assert_eq!(
            escape("<a href='x'>\"&\"</a>\n\u{0}"),
            "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;&#10;\u{FFFD}"
        );
    }

    fn node(id: &str, lines: &[&str], ip_only: bool) -> Node {
        Node {
            id: id.to_owned(),
            lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            ip_only,
        }
    }

    /// A namespace, two pods and an IP source, each named and labelled with [`HOSTILE`] text,
    /// and two arrows.
    fn hostile_graph() -> Graph {
        let pod = format!("pod:{HOSTILE}");
        let ip = format!("ip:{HOSTILE}");
        Graph {
            clusters: BTreeMap::from([(
                HOSTILE.to_owned(),
                vec![
                    node(&pod, &[HOSTILE, &format!("role={HOSTILE}")], false),
                    node("pod:plain", &["plain"], false),
                ],
            )]),
            outside: vec![node(&ip, &[HOSTILE, "IP only"], true)],
            edges: vec![
                Edge {
                    from: ip,
                    to: pod.clone(),
                    probes: vec![HOSTILE.to_owned(), "80/TCP".to_owned()],
                },
                Edge {
                    from: pod,
                    to: "pod:plain".to_owned(),
                    probes: vec!["53/UDP".to_owned()],
                },
            ],
        }
    }

    /// The text of every `<text>` element of an SVG, unescaped.
    fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = t.split_once('>')?.1;
                Some(body.split_once("</text>")?.0)
            })
            .map(|t| {
                t.replace("&quot;", "\"")
                    .replace("&#34;", "\"")
                    .replace("&#39;", "'")
                    .replace("&apos;", "'")
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&#45;", "-")
                    .replace("&amp;", "&")
            })
            .collect()
    }

    #[test]
    fn hostile_names_and_labels_keep_the_dot_whole_and_show_as_written() {
        let text = hostile_graph().write();
        // Every line is a statement, a brace or a comment: nothing the names held broke out.
        for line in text.lines() {
            let line = line.trim();
            assert!(
                line.is_empty()
                    || line.starts_with("//")
                    || line.ends_with(';')
                    || line.ends_with('{')
                    || line == "}",
                "{line}\n{text}"
            );
        }
        if !testbed::have_command("picture::hostile_dot", "dot", "graphviz") {
            return;
        }
        let mut child = Command::new("dot")
            .arg("-Tsvg")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dot -Tsvg: {stderr}\n{text}");
        assert!(stderr.is_empty(), "dot -Tsvg warned: {stderr}\n{text}");
        let svg = String::from_utf8(out.stdout).unwrap();
        // As many clusters, nodes and arrows as drawn: no name made or merged one.
        assert_eq!(svg.matches("class=\"cluster\"").count(), 1, "{svg}");
        assert_eq!(svg.matches("class=\"node\"").count(), 3, "{svg}");
        assert_eq!(svg.matches("class=\"edge\"").count(), 2, "{svg}");
        // Each line of a label shows as written (the control character as U+FFFD).
        let texts = svg_texts(&svg);
        let shown = HOSTILE.replace('\u{1}', "\u{FFFD}");
        let (first, second) = shown.split_once('\n').unwrap();
        for expected in [
            first.to_owned(),
            second.to_owned(),
            format!("role={first}"),
            format!("namespace {first}"),
        ] {
            assert!(texts.contains(&expected), "{expected:?} not in {texts:#?}");
        }
        assert!(
            texts.contains(&format!("{second}, 80/TCP")),
            "the arrow's label: {texts:#?}"
        );
    }

    #[test]
    fn hostile_text_on_the_page_is_escaped_everywhere() {
        let about = About {
            inputs: vec![format!("{HOSTILE}.yaml"), "b.yaml".to_owned()],
            notes: vec![HOSTILE.to_owned()],
            empty: HOSTILE.to_owned(),
        };
        let block = Block {
            probe: HOSTILE.to_owned(),
            columns: vec![HOSTILE.to_owned(), "2 plain".to_owned()],
            rows: vec![
                Row {
                    name: HOSTILE.to_owned(),
                    cells: vec![
                        Mark::Itself(HOSTILE.to_owned()),
                        Mark::Allowed(HOSTILE.to_owned()),
                    ],
                },
                Row {
                    name: "2 plain".to_owned(),
                    cells: vec![
                        Mark::Denied(HOSTILE.to_owned()),
                        Mark::Itself(String::new()),
                    ],
                },
            ],
        };
        let page = Page {
            about: &about,
            empty: false,
            blocks: vec![block],
        }
        .write();
        assert!(!page.contains("<b>"), "{page}");
        assert!(!page.contains("x\""), "{page}");
        let escaped = escape(HOSTILE);
        // An input, the note, the heading, a column's and a row's heading, three titles.
        assert_eq!(page.matches(escaped.as_str()).count(), 8, "{page}");
        assert_eq!(page.matches("<td ").count(), 4, "{page}");
        assert!(page.contains("1 allowed, 1 denied"), "{page}");
        assert_no_external_reference(&page);
    }

    /// No script, stylesheet, image, font or link: the page needs nothing but itself.
    fn assert_no_external_reference(page: &str) {
        let lower = page.to_ascii_lowercase();
        for needle in [
            "<script", "<link", "<img", "<iframe", "src=", "href=", "url(", "@import", "://",
        ] {
            assert!(!lower.contains(needle), "{needle} in {page}");
        }
    }
}
