//! `bindery::run()` logs what it binds where a person sees it, without the application
//! installing anything. Checked on a child process, since a logger is installed once per process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[bindery::stream_function(input = "log-orders", group = "auditors")]
async fn audit(_order: String) {}

/// Where the child reads its configuration; set only for the child.
const CHILD_CONFIG: &str = "BINDERY_LOGGING_TEST_CONFIG";

#[tokio::test]
#[ignore = "the child process of run_logs_each_binding_it_binds, started by it"]
async fn run_child() {
    if std::env::var_os(CHILD_CONFIG).is_none() {
        return;
    }
    bindery::run().await.expect("runs until SIGTERM");
}

#[test]
fn run_logs_each_binding_it_binds() {
    let dir = std::env::temp_dir().join(format!("bindery-logging-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("application.toml");
    std::fs::write(
        &config,
        "[stream.binders.memory]\ntype = \"memory\"\n[stream.bindings.audit-in-0]\ndestination = \"log-orders-v2\"\n",
    )
    .unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "run_child", "--ignored", "--nocapture"])
        .env(CHILD_CONFIG, "1")
        .env("BINDERY_CONFIG", &config)
        .env_remove("RUST_LOG")
        .env_remove("BINDERY_PROFILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, read) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let bound = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match read.recv_timeout(left) {
            Ok(line) if line.contains("bound") => break line,
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                panic!("the child logged no binding within 60s");
            }
        }
    };
    for part in ["audit-in-0", "log-orders-v2", "auditors", "memory"] {
        assert!(bound.contains(part), "{part} missing from: {bound}");
    }
    // SIGTERM: a graceful shutdown, logged too.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut shut_down = false;
    while let Ok(line) = read.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        shut_down |= line.contains("shut down");
    }
    // The child's stderr closed, so it has exited or is about to.
    let status = loop {
        match child.try_wait().unwrap() {
            Some(status) => break status,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => {
                let _ = child.kill();
                panic!("the child did not exit within 60s of SIGTERM");
            }
        }
    };
    assert!(shut_down, "the shutdown was not logged");
    assert!(status.success(), "the child ended with {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
