//! `[management]`: the HTTP server that serves the application's health and bindings.

use std::net::{IpAddr, Ipv4Addr};

use config::Value;

use super::node::{quoted_list, suggestion, ConfigNode, Problems};

/// The management server's settings; the server runs when `[management]` is present.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(not(feature = "management"), allow(dead_code))]
pub(crate) struct ManagementSettings {
    /// `address`: where to listen. Default `0.0.0.0` (every interface, for a container's probes).
    pub(crate) address: IpAddr,
    /// `port`: default 8081; 0 takes any free port.
    pub(crate) port: u16,
    /// `endpoints`: which endpoints answer. Default `["health"]`; `bindings` changes the
    /// application's state, so it answers only when listed.
    pub(crate) endpoints: Vec<Endpoint>,
    /// Where `port` (or, without it, the section) was set, for an error about it.
    pub(crate) origin: String,
}

/// An endpoint of the management server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "management"), allow(dead_code))]
pub(crate) enum Endpoint {
    /// `GET /health`.
    Health,
    /// `GET /bindings`, `GET /bindings/{name}`, `POST /bindings/{name}`.
    Bindings,
    /// `GET /metrics`, with the cargo feature `metrics`.
    Metrics,
    /// `GET /asyncapi.json`, with the cargo feature `asyncapi`.
    AsyncApi,
}

const KEYS: &[&str] = &["address", "port", "endpoints"];
const ENDPOINTS: &[(&str, Endpoint)] = &[
    ("health", Endpoint::Health),
    ("bindings", Endpoint::Bindings),
    ("metrics", Endpoint::Metrics),
    ("asyncapi", Endpoint::AsyncApi),
];

impl ManagementSettings {
    /// Reads `[management]` from the merged configuration; `None` when it is absent (or wrong,
    /// with the problems recorded).
    pub(crate) fn read(root: &Value, problems: &mut Problems) -> Option<ManagementSettings> {
        let root = ConfigNode::new("", root.clone());
        let top = root.entries(&mut Problems::default())?;
        let node = top.get("management")?;
        if !cfg!(feature = "management") {
            problems.at(
                node,
                "the management server is not built in: enable the cargo feature `management` of `bindery` (features = [\"management\"]), or remove the section",
            );
            return None;
        }
        let table = node.table(KEYS, problems)?;
        let mut settings = ManagementSettings {
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 8081,
            endpoints: vec![Endpoint::Health],
            origin: node.origin(),
        };
        if let Some(port) = table.get("port") {
            settings.origin = port.origin();
            settings.port = port.integer_in(0, i64::from(u16::MAX), problems)? as u16;
        }
        if let Some(address) = table.get("address") {
            let text = address.string(problems)?;
            match text.parse() {
                Ok(ip) => settings.address = ip,
                Err(_) => {
                    problems.at(
                        address,
                        format!("expected an IP address such as \"127.0.0.1\" or \"0.0.0.0\", found \"{text}\""),
                    );
                    return None;
                }
            }
        }
        if let Some(endpoints) = table.get("endpoints") {
            let names = endpoints.string_list(problems)?;
            let known: Vec<&str> = ENDPOINTS.iter().map(|(name, _)| *name).collect();
            settings.endpoints.clear();
            for name in names {
                match ENDPOINTS.iter().find(|(known, _)| *known == name) {
                    Some((_, Endpoint::Metrics)) if !cfg!(feature = "metrics") => problems.at(
                        endpoints,
                        "the \"metrics\" endpoint is not built in: enable the cargo feature `metrics` of `bindery` (features = [\"metrics\"]), or remove it",
                    ),
                    Some((_, Endpoint::AsyncApi)) if !cfg!(feature = "asyncapi") => problems.at(
                        endpoints,
                        "the \"asyncapi\" endpoint is not built in: enable the cargo feature `asyncapi` of `bindery` (features = [\"asyncapi\"]), or remove it",
                    ),
                    Some((_, endpoint)) => settings.endpoints.push(*endpoint),
                    None => {
                        let hint = match suggestion(&name, known.iter().copied()) {
                            hint if hint.is_empty() => {
                                format!("; expected some of {}", quoted_list(&known))
                            }
                            hint => hint,
                        };
                        problems.at(endpoints, format!("unknown endpoint \"{name}\"{hint}"));
                    }
                }
            }
        }
        Some(settings)
    }

    /// Whether `endpoint` answers.
    #[cfg(feature = "management")]
    pub(crate) fn serves(&self, endpoint: Endpoint) -> bool {
        self.endpoints.contains(&endpoint)
    }
}
