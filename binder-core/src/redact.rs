//! Keeps secrets out of logs and errors.

/// Whether a configuration key names a secret, so its value is never shown.
///
/// ```
/// use bindery_core::redact::is_secret_key;
/// assert!(is_secret_key("stream.binders.kafka.sasl.password"));
/// assert!(is_secret_key("vendor.api-key"));
/// assert!(is_secret_key("proxy.auth"));
/// assert!(!is_secret_key("stream.bindings.authorize-in-0.destination"));
/// ```
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // Parts of a name that mean a secret wherever they appear.
    let anywhere = [
        "password",
        "passwd",
        "passphrase",
        "secret",
        "sasl",
        "token",
        "credential",
        "ssl.key",
        "private",
        "api-key",
        "api_key",
        "apikey",
        "access-key",
        "access_key",
        "signing-key",
        "signing_key",
    ];
    // Whole words that mean a secret, but also begin ordinary ones (`authorize`, `passenger`).
    let words = ["auth", "pass", "pwd"];
    anywhere.iter().any(|part| key.contains(part))
        || key
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .split(['-', '_'])
            .any(|word| words.contains(&word))
}

/// Replaces the password of every `scheme://user:password@host` in `text` with `***`.
///
/// ```
/// use bindery_core::redact::redact_uri;
/// assert_eq!(redact_uri("amqp://guest:s3cret@mq:5672/%2f"), "amqp://guest:***@mq:5672/%2f");
/// assert_eq!(redact_uri("localhost:9092"), "localhost:9092");
/// ```
pub fn redact_uri(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (before, after) = rest.split_at(scheme_end + 3);
        out.push_str(before);
        // The user part ends at the last `@` before a space, not at the first `/`, `?` or
        // `#`: a password written with one of those unescaped is hidden all the same (hiding
        // a port or path with it is the lesser harm).
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let uri = &after[..end];
        match uri.rfind('@') {
            Some(at) => {
                let userinfo = &uri[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&uri[at..]);
            }
            None => out.push_str(uri),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `uri`, taken whole as one URI, without its password: unlike [`redact_uri`], which reads URIs
/// out of text and ends each at a space, a password written with a space in it is hidden too.
///
/// ```
/// use bindery_core::redact::redact_whole_uri;
/// assert_eq!(redact_whole_uri("amqp://app:my secret@mq:5672/%2f"), "amqp://app:***@mq:5672/%2f");
/// assert_eq!(redact_whole_uri("amqp://mq:5672/%2f"), "amqp://mq:5672/%2f");
/// ```
pub fn redact_whole_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return redact_uri(uri);
    };
    let (scheme, rest) = uri.split_at(scheme_end + 3);
    let Some(at) = rest.rfind('@') else {
        return uri.to_owned();
    };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}{user}:***{host}"),
        None => uri.to_owned(),
    }
}

/// The value as it may be shown for `key`: `***` for secrets, URIs without their password.
pub fn display_value(key: &str, value: &str) -> String {
    if is_secret_key(key) {
        "***".to_owned()
    } else {
        redact_uri(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_uris_are_hidden() {
        assert_eq!(
            redact_uri("failed to reach amqp://app:hunter2@mq.internal:5672/vh and amqp://x@y"),
            "failed to reach amqp://app:***@mq.internal:5672/vh and amqp://x@y"
        );
    }

    #[test]
    fn a_password_with_characters_a_uri_must_escape_is_hidden_too() {
        for (uri, shown) in [
            (
                "amqp://app:s3cr/t@mq:5672/%2f",
                "amqp://app:***@mq:5672/%2f",
            ),
            ("amqp://app:p?ss#w@mq", "amqp://app:***@mq"),
            ("`amqp://app:a/b@mq/vh`: bad", "`amqp://app:***@mq/vh`: bad"),
            ("amqp://mq:5672/vh", "amqp://mq:5672/vh"),
        ] {
            assert_eq!(redact_uri(uri), shown);
        }
    }

    #[test]
    fn a_whole_uri_hides_a_password_with_spaces_and_at_signs() {
        for (uri, shown) in [
            (
                "amqp://guest:my secret@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("amqps://u:a b@c\td@mq/vh", "amqps://u:***@mq/vh"),
            ("amqp://user@mq/vh", "amqp://user@mq/vh"),
            ("amqp://mq:5672/vh", "amqp://mq:5672/vh"),
        ] {
            assert_eq!(redact_whole_uri(uri), shown);
        }
    }

    #[test]
    fn secret_keys_hide_their_values() {
        assert_eq!(display_value("sasl.password", "hunter2"), "***");
        assert_eq!(display_value("brokers", "localhost:9092"), "localhost:9092");
    }
}
