//! `tessera flows`, the binary, against an agent-like server: a few lines of HTTP/1.1 that
//! answer `GET /flows` with chunked JSON lines as docs/flow-log.md describes them. What the
//! command asks (the query string) and what it prints are checked as a user would see them.
//! (The agent's real endpoint is tested with the same command's code in the crate's unit
//! tests, `agent::http::tests`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::thread;

/// Two records as an agent writes them: a PKI peer denied by isolation (ingress), and an
/// allowed egress flow to an address, sampled.
const DENIED: &str = r#"{"v":1,"time":"2026-05-28T20:26:40.123Z","node":"node-b","direction":"ingress","protocol":"TCP","source":{"ip":"10.0.1.2","port":40000,"namespace":"shop","workload":"web-1","labels":{"app":"web"},"identity":"pki","node":"node-a"},"destination":{"ip":"10.0.2.2","port":5432,"namespace":"shop","workload":"db-0","labels":{"app":"db"},"identity":"local"},"verdict":"denied","policy":{"kind":"NetworkPolicy","namespace":"shop","name":"db","isolatedBy":["shop/db"]},"reason":"policy_ingress","suppressed":3}"#;
const ALLOWED: &str = r#"{"v":1,"time":"2026-05-28T20:26:41.000Z","node":"node-b","direction":"egress","protocol":"UDP","source":{"ip":"10.0.2.2","port":40001,"namespace":"shop","workload":"db-0","identity":"local"},"destination":{"ip":"192.0.2.53","port":53,"identity":"ip"},"verdict":"allowed","policy":{"kind":"default","name":"not_isolated"},"sampleRate":10}"#;
/// A record of a later schema version: passed through as JSON, skipped (with a note) as text.
const FUTURE: &str = r#"{"v":2,"time":"2026-05-28T20:26:42.000Z","somethingNew":true}"#;

/// Serves one request: answers it with `status` and the `body` lines, each its own chunk (a
/// blank one as a keep-alive first), then ends the response. Returns the request line.
fn agent(status: &'static str, body: &'static [&'static str]) -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
        }
        tx.send(request.trim().to_owned()).unwrap();
        respond(conn, status, body);
    });
    (addr, rx)
}

fn respond(mut conn: TcpStream, status: &str, body: &[&str]) {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut chunks = vec!["\n".to_owned()];
    chunks.extend(body.iter().map(|l| format!("{l}\n")));
    for c in chunks {
        write!(conn, "{:x}\r\n{c}\r\n", c.len()).unwrap();
        conn.flush().unwrap();
    }
    write!(conn, "0\r\n\r\n").unwrap();
}

fn flows(addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("flows")
        .args(["--addr", addr])
        .args(args)
        .env_remove("TESSERA_METRICS_ADDR")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn json_output_is_the_records_as_the_agent_sent_them() {
    let (addr, request) = agent("200 OK", &[DENIED, ALLOWED, FUTURE]);
    let out = flows(&addr, &["--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{DENIED}\n{ALLOWED}\n{FUTURE}\n"));
    assert_eq!(request.recv().unwrap(), "GET /flows?last=20 HTTP/1.1");
}

#[test]
fn text_output_says_who_what_and_by_which_policy() {
    let (addr, request) = agent("200 OK", &[DENIED, ALLOWED, FUTURE]);
    let out = flows(
        &addr,
        &[
            "--namespace",
            "shop",
            "--pod",
            "db-0",
            "--label",
            "app=db",
            "--verdict",
            "denied",
            "--protocol",
            "tcp",
            "--port",
            "5432",
            "--since",
            "10m",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "2026-05-28T20:26:40.123Z node-b shop/web-1 [pki@node-a] -> shop/db-0 [local] TCP 5432 ingress DENIED by NetworkPolicy shop/db (isolated: no rule matches) (policy_ingress) [+3 suppressed]\n\
         2026-05-28T20:26:41.000Z node-b shop/db-0 [local] -> 192.0.2.53 [ip] UDP 53 egress ALLOWED by default (not isolated) [1 in 10]\n"
    );
    assert!(
        stderr(&out).contains("skipping records"),
        "{}",
        stderr(&out)
    );
    // The filters went to the agent.
    assert_eq!(
        request.recv().unwrap(),
        "GET /flows?since=600000ms&namespace=shop&pod=db-0&label=app%3Ddb&verdict=denied&protocol=TCP&port=5432 HTTP/1.1"
    );
}

#[test]
fn follow_says_when_the_agent_ends_the_stream() {
    let (addr, request) = agent("200 OK", &[DENIED]);
    let out = flows(&addr, &["--follow", "-o", "json"]);
    assert_eq!(stdout(&out), format!("{DENIED}\n"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the agent ended the stream"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        request.recv().unwrap(),
        "GET /flows?follow=1&last=20 HTTP/1.1"
    );
}

#[test]
fn errors_name_the_agent_and_the_reason() {
    let (addr, _request) = agent("400 Bad Request", &["unknown parameter \"x\""]);
    let out = flows(&addr, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("400") && stderr(&out).contains("unknown parameter"),
        "{}",
        stderr(&out)
    );
    // Nobody listens.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = flows(&format!("127.0.0.1:{port}"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no agent answers"),
        "{}",
        stderr(&out)
    );
    // Bad flags never reach an agent.
    for bad in [
        &["--verdict", "maybe"][..],
        &["--since", "soon"],
        &["--port", "http"],
    ] {
        let out = flows("127.0.0.1:9", bad);
        assert!(!out.status.success());
        assert!(!stderr(&out).contains("no agent answers"), "{bad:?}");
    }
}
