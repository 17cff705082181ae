//! Configuration: layering of files, profiles and environment variables, and every kind of
//! mistake reported with its file and key before anything connects.

use std::path::PathBuf;

use bindery::{ApplicationBuilder, Decoded, Encoded, StreamFunction};

fn functions() -> ApplicationBuilder {
    let bill = StreamFunction::function("bill", |n: Decoded<u64>| async move { Encoded(n.0) });
    let audit = StreamFunction::consumer("audit", |_: String| async {});
    let ticker = StreamFunction::supplier("ticker", || async { "tick" });
    bindery::application()
        .without_registered_functions()
        .function(bill)
        .function(audit)
        .function(ticker)
        .environment(Vec::<(String, String)>::new())
}

fn build(toml: &str) -> Result<bindery::Application, bindery::Error> {
    functions().config_str("application.toml", toml).build()
}

/// The error text for an invalid configuration; fails the test if it was accepted.
fn error_of(toml: &str) -> String {
    match build(toml) {
        Ok(_) => panic!("configuration was accepted but should not be:\n{toml}"),
        Err(error) => error.to_string(),
    }
}

/// Like `error_of`, with the core builder: only the memory binder is available.
fn core_error_of(toml: &str) -> String {
    let bill = StreamFunction::function("bill", |n: Decoded<u64>| async move { Encoded(n.0) });
    bindery::Application::builder()
        .without_registered_functions()
        .function(bill)
        .environment(Vec::<(String, String)>::new())
        .config_str("application.toml", toml)
        .build()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("configuration was accepted but should not be:\n{toml}"))
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "expected {part:?} in:\n{text}");
    }
}

#[test]
fn a_valid_configuration_is_accepted() {
    let app = build(
        r#"
[stream]
default-binder = "memory"
function.definition = "bill;audit"
shutdown-timeout = "5s"
output-bindings = "alerts"

[stream.bindings.bill-in-0]
destination = "orders"
group = "billing"
content-type = "application/json"
binder = "memory"

[stream.bindings.bill-in-0.consumer]
max-attempts = 3
back-off-initial-interval = "1s"
back-off-multiplier = 2.0
back-off-max-interval = "10s"
concurrency = 2
dlq = true

[stream.bindings.bill-out-0]
destination = "invoices"

[stream.bindings.alerts-out-0]
destination = "alerts-v1"

[stream.binders.memory]
type = "memory"

[stream.default.consumer]
max-attempts = 5

[greeter]
greeting = "hello"
"#,
    )
    .expect("valid configuration");
    assert_eq!(
        app.config().get::<String>("greeter.greeting").unwrap(),
        "hello"
    );
    assert_eq!(
        app.output_destinations(),
        vec![
            "alerts-v1".to_owned(),
            "invoices".to_owned(),
            "orders.billing.dlq".to_owned()
        ]
    );
}

#[test]
fn unknown_key_under_stream_is_named_with_a_suggestion() {
    let text = error_of(r#"stream.default-bindr = "memory""#);
    assert_mentions(
        &text,
        &[
            "application.toml",
            "`stream.default-bindr`",
            "did you mean `default-binder`?",
        ],
    );
}

#[test]
fn unknown_binding_key_is_named_with_a_suggestion() {
    let text = error_of("[stream.bindings.bill-in-0]\ndestinaton = \"orders\"");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-in-0.destinaton`",
            "did you mean `destination`?",
        ],
    );
}

#[test]
fn unknown_consumer_key_is_named_with_a_suggestion() {
    let text = error_of("[stream.bindings.bill-in-0.consumer]\nmax-atempts = 3");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-in-0.consumer.max-atempts`",
            "did you mean `max-attempts`?",
        ],
    );
}

#[test]
fn a_value_of_the_wrong_type_is_named() {
    let text = error_of("[stream.bindings.bill-in-0.consumer]\nmax-attempts = \"three\"");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-in-0.consumer.max-attempts`",
            "expected a whole number, found \"three\"",
        ],
    );
}

#[test]
fn max_attempts_below_one_is_rejected() {
    let text = error_of("[stream.default.consumer]\nmax-attempts = 0");
    assert_mentions(
        &text,
        &[
            "`stream.default.consumer.max-attempts`",
            "must be at least 1, found 0",
        ],
    );
}

#[test]
fn a_bad_duration_is_rejected() {
    let text =
        error_of("[stream.bindings.bill-in-0.consumer]\nback-off-initial-interval = \"soon\"");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-in-0.consumer.back-off-initial-interval`",
            "expected a duration such as \"1s\"",
        ],
    );
}

#[test]
fn a_duration_given_as_a_number_is_rejected() {
    let text = error_of("[stream]\nshutdown-timeout = 30");
    assert_mentions(
        &text,
        &[
            "`stream.shutdown-timeout`",
            "expected a duration",
            "found 30",
        ],
    );
}

#[test]
fn a_binding_name_that_matches_no_function_is_named_with_a_suggestion() {
    let text = error_of("[stream.bindings.bil-in-0]\ndestination = \"orders\"");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bil-in-0`",
            "no stream function has a binding named `bil-in-0`",
            "did you mean `bill-in-0`?",
        ],
    );
}

#[test]
fn an_unknown_function_in_the_definition_is_named() {
    let text = error_of(r#"stream.function.definition = "bill;audti""#);
    assert_mentions(
        &text,
        &[
            "`stream.function.definition`",
            "no stream function is named `audti`",
            "did you mean `audit`?",
        ],
    );
}

#[test]
fn function_composition_is_refused_clearly() {
    let text = error_of(r#"stream.function.definition = "bill|audit""#);
    assert_mentions(
        &text,
        &[
            "`stream.function.definition`",
            "composition with `|` is not supported",
        ],
    );
}

#[test]
fn an_unknown_binder_type_is_named_with_a_suggestion() {
    let text = error_of("[stream.binders.main]\ntype = \"memroy\"");
    assert_mentions(
        &text,
        &[
            "`stream.binders.main.type`",
            "unknown binder type `memroy`",
            "did you mean `memory`?",
        ],
    );
}

#[test]
fn a_binder_type_that_is_not_compiled_in_names_the_feature() {
    // The core builder alone knows only the memory binder, as a build without features does.
    let text = core_error_of("[stream.binders.cluster]\ntype = \"kafka\"");
    assert_mentions(
        &text,
        &[
            "`stream.binders.cluster.type`",
            "enable the `kafka` feature",
        ],
    );
}

#[test]
fn a_binding_naming_an_unknown_binder_is_rejected() {
    let text = error_of(
        "[stream.binders.local]\ntype = \"memory\"\n[stream.bindings.bill-in-0]\nbinder = \"locl\"",
    );
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-in-0.binder`",
            "no binder is named `locl`",
            "did you mean `local`?",
        ],
    );
}

#[test]
fn an_unknown_default_binder_is_rejected() {
    let text = error_of(r#"stream.default-binder = "rabit""#);
    assert_mentions(
        &text,
        &["`stream.default-binder`", "no binder is named `rabit`"],
    );
}

#[test]
fn several_binders_need_a_default() {
    let text = error_of(
        "[stream.binders.one]\ntype = \"memory\"\n[stream.binders.two]\ntype = \"memory\"",
    );
    assert_mentions(
        &text,
        &[
            "`stream.default-binder`",
            "several binders are configured (`one`, `two`)",
        ],
    );
}

#[test]
fn a_binder_without_a_type_is_rejected() {
    let text = error_of("[stream.binders.cluster]\nbrokers = \"localhost:9092\"");
    assert_mentions(&text, &["`stream.binders.cluster`", "missing `type`"]);
}

#[test]
fn an_unsupported_content_type_is_rejected() {
    let text = error_of("[stream.bindings.bill-in-0]\ncontent-type = \"application/x-protobuf\"");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-in-0.content-type`",
            "unsupported content type",
        ],
    );
}

#[test]
fn a_dlq_needs_a_group() {
    let text = error_of("[stream.bindings.audit-in-0.consumer]\ndlq = true");
    assert_mentions(
        &text,
        &["`stream.bindings.audit-in-0.consumer.dlq`", "no group"],
    );
}

#[test]
fn a_multiplier_below_one_is_rejected() {
    let text = error_of("[stream.default.consumer]\nback-off-multiplier = 0.5");
    assert_mentions(
        &text,
        &[
            "`stream.default.consumer.back-off-multiplier`",
            "at least 1",
        ],
    );
}

#[test]
fn a_memory_binder_has_no_settings() {
    let text = error_of("[stream.binders.memory]\ntype = \"memory\"\ncapacity = 10");
    assert_mentions(&text, &["`stream.binders.memory.capacity`", "unknown key"]);
}

#[test]
fn binder_specific_sections_of_missing_binders_name_the_feature() {
    let text = core_error_of("[stream.rabbit.bindings.bill-in-0.consumer]\nprefetch = 10");
    assert_mentions(&text, &["`stream.rabbit`", "enable the `rabbit` feature"]);
    let text =
        core_error_of("[stream.kafka.bindings.bill-in-0.consumer]\nstart-offset = \"earliest\"");
    assert_mentions(&text, &["`stream.kafka`", "enable the `kafka` feature"]);
}

#[test]
fn a_toml_syntax_error_names_the_file() {
    let text = error_of("[stream\ndefault-binder = 1");
    assert_mentions(&text, &["cannot read configuration file application.toml"]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = error_of("[stream]\ndefault-bindr = \"memory\"\nshutdown-timeout = \"never\"");
    assert_mentions(
        &text,
        &["`stream.default-bindr`", "`stream.shutdown-timeout`"],
    );
}

#[test]
fn a_bad_poll_on_a_supplier_is_reported() {
    let ticker = StreamFunction::supplier("slow", || async { "tick" }).poll("often");
    let error = bindery::application()
        .without_registered_functions()
        .function(ticker)
        .config_str("application.toml", "")
        .environment(Vec::<(String, String)>::new())
        .build()
        .unwrap_err()
        .to_string();
    assert_mentions(&error, &["`poll`", "\"often\" is not a duration"]);
}

#[test]
fn debug_of_the_error_reads_like_display() {
    let error = build(r#"stream.default-bindr = "memory""#).unwrap_err();
    assert_eq!(format!("{error:?}"), error.to_string());
}

fn temp_dir() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("bindery-config-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn profiles_and_environment_variables_override_the_base_file_in_order() {
    let dir = temp_dir();
    std::fs::write(
        dir.join("application.toml"),
        "[stream.bindings.bill-in-0]\ndestination = \"orders\"\ngroup = \"base\"\n[app]\nname = \"base\"\nlevel = 1",
    )
    .unwrap();
    std::fs::write(
        dir.join("application-staging.toml"),
        "[app]\nname = \"staging\"\nlevel = 2",
    )
    .unwrap();
    std::fs::write(dir.join("application-eu.toml"), "[app]\nlevel = 3").unwrap();
    let app = functions()
        .config_file(dir.join("application.toml"))
        .environment([
            ("BINDERY_PROFILE", "staging,eu"),
            ("BINDERY_APP__REGION", "eu-west-1"),
            (
                "BINDERY_STREAM__BINDINGS__BILL_IN_0__DESTINATION",
                "orders-v2",
            ),
        ])
        .build()
        .expect("valid");
    assert_eq!(app.config().get::<String>("app.name").unwrap(), "staging");
    assert_eq!(app.config().get::<i64>("app.level").unwrap(), 3);
    assert_eq!(
        app.config().get::<String>("app.region").unwrap(),
        "eu-west-1"
    );
    // The environment overrides the file's destination and keeps its group.
    let bill_in = app
        .bindings()
        .into_iter()
        .find(|b| b.name == "bill-in-0")
        .expect("bill-in-0 is bound");
    assert_eq!(bill_in.destination, "orders-v2");
    assert_eq!(bill_in.group.as_deref(), Some("base"));
    // `[stream]` is the framework's: the application's configuration does not hold it.
    assert!(app
        .config()
        .get_opt::<String>("stream.bindings.bill-in-0.destination")
        .unwrap()
        .is_none());
}

#[test]
fn debug_output_and_configuration_errors_never_show_secrets() {
    let toml = r#"
[stream.binders.rabbit]
type = "rabbit"
uri = "amqp://app:hunter2@mq.internal:5672/%2f"
[stream.rabbit.bindings.bill-in-0.consumer]
prefetch = 10
[db]
password = "s3cr3t-pw"
port = "not-a-port"
[vendor]
api-key = "k-12345"
passphrase = "open sesame"
"#;
    let app = functions()
        .config_str("application.toml", toml)
        .environment([("BINDERY_STREAM__DEFAULT_BINDER", "rabbit")])
        .build();
    let shown = match &app {
        Ok(app) => format!("{app:?} {:?}", app.config()),
        Err(error) => format!("{error} {error:?}"),
    };
    let port_error = app
        .as_ref()
        .map(|app| app.config().get::<u16>("db.port").unwrap_err().to_string())
        .unwrap_or_default();
    let password_error = app
        .as_ref()
        .map(|app| {
            app.config()
                .get::<u16>("db.password")
                .unwrap_err()
                .to_string()
        })
        .unwrap_or_default();
    for secret in ["hunter2", "s3cr3t-pw", "k-12345", "open sesame"] {
        for text in [&shown, &port_error, &password_error] {
            assert!(!text.contains(secret), "{secret} shown in: {text}");
        }
    }
    assert!(shown.contains("mq.internal"), "the rest is shown: {shown}");
    // A file that does not parse is named with the line and the reason, never the line's text.
    let broken = error_of("[db]\npassword = \"pa\\qss-9f\"\n");
    assert!(!broken.contains("pa\\qss-9f"), "{broken}");
    assert!(broken.contains("application.toml"), "{broken}");
    // Nor does the builder's `Debug` show the text or environment it was given.
    let builder = functions()
        .config_str("application.toml", toml)
        .environment([("BINDERY_DB__PASSWORD", "env-s3cret")]);
    let shown = format!("{builder:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("env-s3cret"),
        "{shown}"
    );
    assert!(password_error.contains("db.password"), "{password_error}");
}

#[test]
fn a_bad_environment_variable_is_named() {
    let error = functions()
        .config_str("application.toml", "")
        .environment([(
            "BINDERY_STREAM__BINDINGS__BILL_IN_0__CONSUMER__MAX_ATTEMPTS",
            "many",
        )])
        .build()
        .unwrap_err()
        .to_string();
    assert_mentions(
        &error,
        &[
            "environment variable BINDERY_STREAM__BINDINGS__BILL_IN_0__CONSUMER__MAX_ATTEMPTS",
            "`stream.bindings.bill-in-0.consumer.max-attempts`",
            "expected a whole number",
        ],
    );
}

#[test]
fn a_bad_key_in_a_profile_file_names_that_file() {
    let dir = temp_dir();
    std::fs::write(dir.join("application.toml"), "").unwrap();
    std::fs::write(
        dir.join("application-prod.toml"),
        "[stream.bindings.bill-in-0]\ngroupp = \"x\"",
    )
    .unwrap();
    let error = functions()
        .config_file(dir.join("application.toml"))
        .profile("prod")
        .build()
        .unwrap_err()
        .to_string();
    assert_mentions(
        &error,
        &[
            "application-prod.toml",
            "`stream.bindings.bill-in-0.groupp`",
            "did you mean `group`?",
        ],
    );
}

#[test]
fn a_missing_profile_file_is_an_error() {
    let dir = temp_dir();
    std::fs::write(dir.join("application.toml"), "").unwrap();
    let error = functions()
        .config_file(dir.join("application.toml"))
        .profile("kafka")
        .build()
        .unwrap_err()
        .to_string();
    assert_mentions(
        &error,
        &["application-kafka.toml", "profile `kafka` is active"],
    );
}

#[test]
fn a_missing_config_file_from_bindery_config_is_an_error() {
    let error = functions()
        .environment([("BINDERY_CONFIG", "/nonexistent/bindery.toml")])
        .build()
        .unwrap_err()
        .to_string();
    assert_mentions(&error, &["/nonexistent/bindery.toml", "no such file"]);
}

#[test]
fn secrets_never_appear_in_errors() {
    let text = error_of("[stream.binders.main]\ntype = \"memory\"\npassword = \"hunter2\"\nuri = \"amqp://app:hunter2@mq:5672\"");
    assert!(!text.contains("hunter2"), "secret leaked in:\n{text}");
    assert_mentions(
        &text,
        &[
            "`stream.binders.main.password`",
            "`stream.binders.main.uri`",
        ],
    );
}

#[test]
fn kafka_settings_are_checked_with_file_and_key() {
    let text = error_of(
        "[stream.binders.kafka]\ntype = \"kafka\"\nbrokrs = \"localhost:9092\"\nmin-partition-count = 0\n[stream.kafka.bindings.bill-in-0.consumer]\nstart-offset = \"beginning\"",
    );
    assert_mentions(
        &text,
        &[
            "`stream.binders.kafka.brokrs`",
            "did you mean `brokers`?",
            "`stream.binders.kafka.min-partition-count`",
            "`stream.kafka.bindings.bill-in-0.consumer.start-offset`",
            "expected \"earliest\" or \"latest\"",
        ],
    );
}

#[test]
fn a_rabbit_uri_that_cannot_be_read_is_named_by_key_and_its_password_never_shown() {
    let text = error_of(
        "[stream.binders.rabbit]\ntype = \"rabbit\"\nuri = \"amqp://app:s3cr/t@mq:5672/%2f\"",
    );
    assert_mentions(
        &text,
        &[
            "`stream.binders.rabbit.uri`",
            "percent-encode",
            "application.toml",
        ],
    );
    assert!(!text.contains("s3cr"), "{text}");
}

#[test]
fn rabbit_settings_are_checked_with_file_and_key() {
    let text = error_of(
        "[stream.binders.rabbit]\ntype = \"rabbit\"\nuri = \"localhost\"\n[stream.rabbit.bindings.bill-in-0.consumer]\nprefech = 10\nexchange-type = \"round-robin\"",
    );
    assert_mentions(
        &text,
        &[
            "`stream.binders.rabbit.uri`",
            "expected an AMQP URI",
            "`stream.rabbit.bindings.bill-in-0.consumer.prefech`",
            "did you mean `prefetch`?",
            "unknown exchange type",
        ],
    );
}

#[test]
fn rabbit_routing_keys_longer_than_amqp_allows_are_refused_with_file_and_key() {
    let long = "k".repeat(256);
    let text = error_of(&format!(
        "[stream.binders.rabbit]\ntype = \"rabbit\"\n[stream.rabbit.bindings.bill-out-0.producer]\nrouting-key = \"{long}\"\nbinding-routing-key = \"{long}\"\n[stream.rabbit.bindings.bill-in-0.consumer]\nbinding-routing-key = \"{long}\""
    ));
    assert_mentions(
        &text,
        &[
            "application.toml",
            "`stream.rabbit.bindings.bill-out-0.producer.routing-key`",
            "`stream.rabbit.bindings.bill-out-0.producer.binding-routing-key`",
            "`stream.rabbit.bindings.bill-in-0.consumer.binding-routing-key`",
            "at most 255 bytes",
        ],
    );
}

#[test]
fn durations_beyond_a_year_are_refused_with_file_and_key() {
    let text = error_of(
        "[stream]\nshutdown-timeout = \"10000000000000000000s\"\n[stream.bindings.bill-in-0.consumer]\nback-off-max-interval = \"400days\"",
    );
    assert_mentions(
        &text,
        &[
            "application.toml",
            "`stream.shutdown-timeout`",
            "`stream.bindings.bill-in-0.consumer.back-off-max-interval`",
            "at most 365 days",
        ],
    );
}

#[test]
fn a_direct_exchange_with_the_catch_all_binding_key_is_refused() {
    let text = error_of(
        "[stream.binders.rabbit]\ntype = \"rabbit\"\n[stream.rabbit.bindings.bill-in-0.consumer]\nexchange-type = \"direct\"",
    );
    assert_mentions(
        &text,
        &[
            "`stream.rabbit.bindings.bill-in-0.consumer.exchange-type`",
            "set `binding-routing-key`",
        ],
    );
}

#[test]
fn kafka_settings_that_would_lose_or_hang_sends_are_refused_with_file_and_key() {
    let text = error_of(
        "[stream.binders.kafka]\ntype = \"kafka\"\nconfiguration.acks = \"1\"\nconfiguration.\"enable.idempotence\" = \"false\"\nconfiguration.\"message.timeout.ms\" = \"0\"",
    );
    assert_mentions(
        &text,
        &[
            "application.toml",
            "`stream.binders.kafka.configuration.acks`",
            "would let the broker lose confirmed messages",
            "`stream.binders.kafka.configuration.\"enable.idempotence\"`",
            "duplicated or reordered",
            "`stream.binders.kafka.configuration.\"message.timeout.ms\"`",
            "wait forever",
        ],
    );
}

#[test]
fn kafka_passthrough_secrets_are_never_shown() {
    let text = error_of(
        "[stream.binders.kafka]\ntype = \"kafka\"\nconfiguration.\"sasl.password\" = [\"hunter2\"]",
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert_mentions(&text, &["sasl.password"]);
}

#[test]
fn settings_that_would_be_ignored_are_errors() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[stream.bindings.bill-out-0]\ngroup = \"billing\"",
            &[
                "application.toml",
                "stream.bindings.bill-out-0.group",
                "output binding",
            ],
        ),
        (
            "[stream.bindings.bill-out-0.consumer]\nmax-attempts = 5",
            &["stream.bindings.bill-out-0.consumer", "output binding"],
        ),
        (
            "[stream.bindings.bill-in-0.producer]\nrequired-groups = [\"a\"]",
            &["stream.bindings.bill-in-0.producer", "input binding"],
        ),
        (
            "[stream.bindings.bill-in-0]\ngroup = \"g\"\nconsumer.dlq-name = \"dead\"",
            &["stream.bindings.bill-in-0.consumer.dlq-name", "dlq = true"],
        ),
        (
            "[stream.bindings.bill-in-0.consumer]\nback-off-initial-interval = \"30s\"",
            &[
                "stream.bindings.bill-in-0.consumer.back-off-initial-interval",
                "back-off-max-interval",
            ],
        ),
        (
            "[stream.kafka.bindings.bill-in-0.consumer]\nstart-offset = \"earliest\"",
            &[
                "stream.kafka.bindings.bill-in-0.consumer",
                "type `memory`",
                "[stream.memory.bindings.bill-in-0]",
            ],
        ),
        (
            "[stream]\nfunction.definition = \"\"",
            &["stream.function.definition", "names no function"],
        ),
        (
            "[stream.bindings.bill-in-0.consumer]\nmax-in-flight = 5000000000",
            &[
                "stream.bindings.bill-in-0.consumer.max-in-flight",
                "too large",
            ],
        ),
        (
            "[stream.rabbit.bindings.bill-in-0.consumer]\nprefetch = 100000\n[stream.binders.rabbit]\ntype = \"rabbit\"",
            &["stream.rabbit.bindings.bill-in-0.consumer.prefetch", "at most 65535"],
        ),
    ];
    for (toml, expected) in cases {
        let text = error_of(toml);
        assert_mentions(&text, expected);
    }
}

#[test]
fn a_binder_section_for_the_other_side_of_a_binding_is_an_error() {
    let text = error_of(
        r#"[stream]
default-binder = "kafka"
[stream.binders.kafka]
type = "kafka"
brokers = "127.0.0.1:9092"
[stream.kafka.bindings.bill-out-0.consumer]
start-offset = "earliest"
"#,
    );
    assert_mentions(
        &text,
        &[
            "stream.kafka.bindings.bill-out-0.consumer",
            "output binding",
        ],
    );
}

#[test]
fn an_environment_override_merges_with_a_binding_named_with_underscores() {
    let send = StreamFunction::consumer("send_order", |_: String| async {});
    let app = bindery::application()
        .without_registered_functions()
        .function(send)
        .config_str(
            "application.toml",
            "[stream.bindings.send_order-in-0]\ndestination = \"orders-v3\"\n",
        )
        .environment([(
            "BINDERY_STREAM__BINDINGS__SEND_ORDER_IN_0__GROUP",
            "billing",
        )])
        .build()
        .expect("valid");
    // Both settings reach the one binding: the file's destination is kept.
    let input = &app.bindings()[0];
    assert_eq!(input.name, "send_order-in-0");
    assert_eq!(input.destination, "orders-v3");
    assert_eq!(input.group.as_deref(), Some("billing"));
}

#[test]
fn application_keys_with_underscores_can_be_overridden_from_the_environment() {
    #[derive(serde::Deserialize)]
    struct Limits {
        max_size: u32,
        burst_size: u32,
    }
    let app = functions()
        .config_str("application.toml", "[limits]\nmax_size = 10\n")
        .environment([
            ("BINDERY_LIMITS__MAX_SIZE", "20"),
            ("BINDERY_LIMITS__BURST_SIZE", "5"),
        ])
        .build()
        .expect("valid");
    let limits: Limits = app.config().get("limits").unwrap();
    assert_eq!((limits.max_size, limits.burst_size), (20, 5));

    // A kebab-case key that no file sets is reached too.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Window {
        open_seconds: u32,
    }
    let app = functions()
        .config_str("application.toml", "")
        .environment([("BINDERY_WINDOW__OPEN_SECONDS", "7")])
        .build()
        .expect("valid");
    let window: Window = app.config().get("window").unwrap();
    assert_eq!(window.open_seconds, 7);
}

#[test]
fn an_environment_override_reaches_a_binder_named_with_underscores() {
    let app = functions()
        .config_str(
            "application.toml",
            "[stream.binders.my_store]\ntype = \"memory\"\n",
        )
        .environment([("BINDERY_STREAM__BINDERS__MY_STORE__TYPE", "memory")])
        .build();
    // One binder, overridden; not a second one named `my-store`.
    assert!(app.is_ok(), "{:?}", app.err().map(|e| e.to_string()));
}

#[test]
fn one_file_naming_a_binding_both_ways_is_an_error() {
    let text = error_of(
        "[stream.bindings.bill_x-in-0]\ndestination = \"a\"\n[stream.bindings.bill-x-in-0]\ndestination = \"b\"\n",
    );
    assert_mentions(
        &text,
        &["application.toml", "bill_x-in-0", "bill-x-in-0", "keep one"],
    );
}

#[test]
fn an_instance_index_outside_the_instance_count_is_rejected() {
    let text = error_of(
        "[stream.bindings.bill-in-0.consumer]\npartitioned = true\ninstance-count = 2\ninstance-index = 2",
    );
    assert_mentions(
        &text,
        &[
            "application.toml",
            "`stream.bindings.bill-in-0.consumer.instance-index`",
            "`instance-index` is 2 but `instance-count` is 2",
        ],
    );
}

#[test]
fn partition_settings_from_the_environment_are_checked() {
    let error = functions()
        .config_str("application.toml", "")
        .environment([
            (
                "BINDERY_STREAM__BINDINGS__BILL_OUT_0__PRODUCER__PARTITION_COUNT",
                "0",
            ),
            (
                "BINDERY_STREAM__BINDINGS__BILL_IN_0__CONSUMER__PARTITIONED",
                "yes",
            ),
        ])
        .build()
        .unwrap_err()
        .to_string();
    assert_mentions(
        &error,
        &[
            "`stream.bindings.bill-out-0.producer.partition-count`",
            "must be at least 1, found 0",
            "`stream.bindings.bill-in-0.consumer.partitioned`",
        ],
    );
}

#[test]
fn partition_settings_are_read_from_the_environment() {
    let app = functions()
        .config_str("application.toml", "")
        .environment([
            (
                "BINDERY_STREAM__BINDINGS__BILL_OUT_0__PRODUCER__PARTITION_COUNT",
                "3",
            ),
            (
                "BINDERY_STREAM__BINDINGS__BILL_IN_0__CONSUMER__PARTITIONED",
                "true",
            ),
            (
                "BINDERY_STREAM__BINDINGS__BILL_IN_0__CONSUMER__INSTANCE_COUNT",
                "3",
            ),
            (
                "BINDERY_STREAM__BINDINGS__BILL_IN_0__CONSUMER__INSTANCE_INDEX",
                "2",
            ),
        ])
        .build()
        .expect("valid");
    let bindings = app.bindings();
    let input = bindings
        .iter()
        .find(|b| b.name == "bill-in-0")
        .expect("bill-in-0");
    assert_eq!(input.consumer.partition(), Some(2));
    assert_eq!(input.consumer.instance_count, 3);
    let output = bindings
        .iter()
        .find(|b| b.name == "bill-out-0")
        .expect("bill-out-0");
    assert_eq!(output.producer.partition_count, 3);
}

#[test]
fn a_producer_and_its_partitioned_consumers_must_agree_on_the_partitions() {
    let text = error_of(
        r#"
[stream.bindings.bill-out-0]
destination = "invoices"
producer.partition-count = 2
[stream.bindings.audit-in-0]
destination = "invoices"
group = "auditors"
consumer.partitioned = true
consumer.instance-count = 3
"#,
    );
    assert_mentions(
        &text,
        &[
            "application.toml: `stream.bindings.bill-out-0.producer.partition-count`",
            "in 2 partition(s), but `audit-in-0` reads it as one of 3 partitioned instances",
        ],
    );
    let unpartitioned = error_of(
        r#"
[stream.bindings.bill-out-0]
destination = "invoices"
[stream.bindings.audit-in-0]
destination = "invoices"
group = "auditors"
consumer.partitioned = true
consumer.instance-count = 2
"#,
    );
    assert_mentions(&unpartitioned, &["in 1 partition(s)", "`audit-in-0`"]);
}

#[test]
fn instance_settings_without_partitioned_are_rejected() {
    let text = error_of("[stream.bindings.bill-in-0.consumer]\ninstance-count = 2");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-in-0.consumer.instance-count`",
            "is not partitioned",
            "set `partitioned = true`",
        ],
    );
}

#[test]
fn producer_defaults_apply_key_by_key() {
    let app = build(
        r#"
[stream.default.producer]
partition-count = 2
[stream.bindings.bill-out-0.producer]
required-groups = ["audit"]
"#,
    )
    .expect("valid");
    let output = app
        .bindings()
        .into_iter()
        .find(|b| b.name == "bill-out-0")
        .expect("bill-out-0");
    assert_eq!(output.producer.partition_count, 2);
    assert_eq!(output.producer.required_groups, ["audit"]);
}

#[test]
fn a_partition_count_beyond_the_limit_is_rejected() {
    let text = error_of("[stream.bindings.bill-out-0.producer]\npartition-count = 100000");
    assert_mentions(
        &text,
        &[
            "`stream.bindings.bill-out-0.producer.partition-count`",
            "at most 4096",
        ],
    );
}
