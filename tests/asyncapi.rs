//! The orders example's AsyncAPI document (`cargo run --example orders -- --asyncapi`) on each
//! profile: what it holds, and that `@asyncapi/parser` (from the npm registry, installed once
//! into the cache) finds it valid.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{example_binary, wait_within};

/// The document the example prints with `BINDERY_PROFILE` set to `profile` (none: memory).
fn document(profile: Option<&str>) -> (String, Value) {
    let written = std::env::temp_dir().join(format!(
        "bindery-asyncapi-{}.json",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let file = std::fs::File::create(&written).expect("a file for the document");
    let mut command = Command::new(example_binary("orders"));
    command.arg("--asyncapi").stdout(Stdio::from(file));
    // The document comes from the configuration alone: no broker is contacted.
    command.env_remove("BINDERY_PROFILE");
    if let Some(profile) = profile {
        command.env("BINDERY_PROFILE", profile);
    }
    let mut child = command.spawn().expect("the orders example starts");
    let status = wait_within(&mut child, Duration::from_secs(60), "orders --asyncapi");
    let text = std::fs::read_to_string(&written).expect("the document");
    std::fs::remove_file(&written).ok();
    assert!(status.success(), "orders --asyncapi failed: {text}");
    let document = serde_json::from_str(&text).expect("the document is JSON");
    (text, document)
}

#[test]
fn the_orders_document_has_every_binding_its_payload_schemas_and_no_secret() {
    let (text, document) = document(Some("rabbit"));
    assert_eq!(document["asyncapi"], "3.0.0");
    let rabbit = &document["servers"]["rabbit"];
    assert_eq!(rabbit["protocol"], "amqp", "{document:#}");
    assert_eq!(rabbit["host"], "127.0.0.1:5672", "{document:#}");
    assert!(
        !text.contains("guest"),
        "credentials in the document: {text}"
    );
    for (channel, address) in [
        ("orders", "orders"),
        ("payments", "payments"),
        ("orders.payment.dlq", "orders.payment.dlq"),
    ] {
        assert_eq!(
            document["channels"][channel]["address"], address,
            "{document:#}"
        );
    }
    for (operation, action, channel) in [
        ("inventory-in-0", "receive", "orders"),
        ("payment-in-0", "receive", "orders"),
        ("payment-out-0", "send", "payments"),
        ("ledger-in-0", "receive", "payments"),
        ("audit-in-0", "receive", "orders.payment.dlq"),
        ("placed-out-0", "send", "orders"),
    ] {
        let described = &document["operations"][operation];
        assert_eq!(described["action"], action, "{operation}: {document:#}");
        assert_eq!(
            described["channel"]["$ref"],
            format!("#/channels/{channel}"),
            "{operation}: {document:#}"
        );
    }
    let message = &document["components"]["messages"]["payment-out-0-message"];
    assert_eq!(message["contentType"], "application/json");
    assert_eq!(
        message["payload"]["properties"]["charged_cents"]["type"], "integer",
        "the schema of PaymentProcessed: {document:#}"
    );
    let order = &document["components"]["messages"]["inventory-in-0-message"]["payload"];
    assert_eq!(
        order["properties"]["customer"]["type"], "string",
        "{document:#}"
    );
}

/// Where `@asyncapi/parser` is installed: the cache, filled with npm the first time.
fn parser() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME");
    let dir = cache.join("bindery").join("asyncapi");
    if dir.join("node_modules/@asyncapi/parser").is_dir() {
        return Some(dir);
    }
    std::fs::create_dir_all(&dir).expect("the cache directory");
    let install = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "@asyncapi/parser@3"])
        .current_dir(&dir)
        .spawn();
    match install {
        Ok(mut npm) => {
            let status = wait_within(&mut npm, Duration::from_secs(600), "npm install");
            assert!(status.success(), "npm install @asyncapi/parser failed");
            Some(dir)
        }
        Err(error) if std::env::var_os("CI").is_none() => {
            bindery::test::shout(&format!("!!!!!!!! SKIPPING THE AsyncAPI VALIDATION: npm does not run ({error}); install Node.js to run it !!!!!!!!"));
            None
        }
        Err(error) => panic!(
            "npm does not run ({error}); CI validates the AsyncAPI documents with @asyncapi/parser"
        ),
    }
}

#[test]
fn the_orders_documents_are_valid_asyncapi_on_every_profile() {
    let Some(parser) = parser() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!(
        "bindery-asyncapi-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).expect("a directory for the documents");
    let mut files = Vec::new();
    for profile in [None, Some("rabbit"), Some("kafka")] {
        let (text, _) = document(profile);
        let file = dir.join(format!("orders-{}.json", profile.unwrap_or("memory")));
        std::fs::write(&file, text).expect("the document written");
        files.push(file);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/validate-asyncapi.cjs");
    let mut node = Command::new("node")
        .arg(script)
        .args(&files)
        .env("NODE_PATH", parser.join("node_modules"))
        .spawn()
        .expect("node runs");
    let status = wait_within(&mut node, Duration::from_secs(120), "the AsyncAPI parser");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        status.success(),
        "@asyncapi/parser found an error (printed above)"
    );
}
