//! docs/config.md, the configuration reference, generated from the config structs: their
//! schemas (keys, types, doc comments) and their defaults as they serialize. The test keeps
//! the file current: `KILN_WRITE_DOCS=1 cargo test -p kiln-server reference` rewrites it.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};

const INTRO: &str = "# Kiln configuration

<!-- Generated from the config structs by shared/server/src/reference.rs (KILN_WRITE_DOCS=1 cargo test -p kiln-server reference); do not edit. -->

Every Kiln process (`kiln dev`, `kiln serve <services>`) reads its settings in this order, each
overriding the one before: the defaults below, the TOML file given with `--config`, then
`KILN_*` environment variables. In a variable's name `__` separates a section and a table from
the key (`KILN_INFERENCE__BATCHING__MAX_BATCH_SIZE=16`); lists are written as TOML arrays
(`KILN_INFERENCE__PRELOAD='[\"accounts/kiln/models/all-minilm-l6-v2\"]'`). Lists of tables
(`[[inference.models]]`) belong in the file.

Start-up stops, naming the key and where its value came from, on an unknown key or a bad value;
`kiln serve --check <services>` validates a configuration without starting. A process reads
and validates only the sections of the services it runs. Durations are text with a unit: `500ms`,
`30s`, `5m`, `2h`, `7d`. Sizes are bytes.
";

/// One section of the reference: where it sits and what it holds.
struct Section {
    title: &'static str,
    /// The TOML table (`None`: the top level).
    table: Option<&'static str>,
    about: &'static str,
    schema: Value,
    defaults: Value,
}

fn section<T: JsonSchema + Serialize + Default>(
    title: &'static str,
    table: Option<&'static str>,
    about: &'static str,
) -> Section {
    Section {
        title,
        table,
        about,
        schema: schemars::schema_for!(T).to_value(),
        defaults: serde_json::to_value(T::default()).expect("defaults serialize"),
    }
}

/// The whole reference.
pub(crate) fn markdown() -> String {
    let sections = [
        section::<kiln_core::config::ServerConfig>(
            "Server",
            None,
            "Settings every process shares, at the top level of the file.",
        ),
        section::<kiln_identity::config::IdentityConfig>(
            "Identity",
            Some("identity"),
            "Accounts, users and API keys.",
        ),
        section::<kiln_registry::config::RegistryConfig>(
            "Registry",
            Some("registry"),
            "Models, datasets and where their files are stored.",
        ),
        section::<kiln_scheduler::config::SchedulerConfig>(
            "Scheduler",
            Some("scheduler"),
            "Nodes, placement and autoscaling of deployments.",
        ),
        section::<kiln_billing::config::BillingConfig>(
            "Billing",
            Some("billing"),
            "Prices, quotas and the usage ledger.",
        ),
        section::<kiln_inference::config::InferenceConfig>(
            "Inference",
            Some("inference"),
            "An inference node: backends, batching, text generation, LoRA addons, fine-tuning.",
        ),
        section::<kiln_gateway::GatewayConfig>(
            "Gateway",
            Some("gateway"),
            "The HTTP edge: the public REST API and OpenAI-style inference.",
        ),
    ];
    let mut out = String::from(INTRO);
    for section in &sections {
        let heading = match section.table {
            Some(table) => format!("`[{table}]`"),
            None => "top level".to_owned(),
        };
        let _ = write!(
            out,
            "\n## {} ({heading})\n\n{}\n\n| key | type | default | environment | about |\n|---|---|---|---|---|\n",
            section.title, section.about
        );
        let defs = section.schema.get("$defs").cloned().unwrap_or_default();
        let walk = Walk {
            defs: &defs,
            table: section.table,
        };
        let mut long_defaults = Vec::new();
        walk.rows(
            &section.schema,
            &[],
            Some(&section.defaults),
            true,
            &mut out,
            &mut long_defaults,
        );
        for (key, value) in long_defaults {
            let _ = write!(
                out,
                "\nThe default `{key}`:\n\n```toml\n{}```\n",
                toml_of(&key, &value)
            );
        }
    }
    out
}

/// The longest default written in its table cell; longer ones follow the table as TOML.
const INLINE_DEFAULT: usize = 48;

struct Walk<'a> {
    defs: &'a Value,
    table: Option<&'static str>,
}

impl Walk<'_> {
    /// `schema` with a `$ref` followed, and an optional (`T` or null) unwrapped; whether it
    /// was optional.
    fn resolve<'s>(&'s self, schema: &'s Value) -> (&'s Value, bool) {
        if let Some(name) = schema.get("$ref").and_then(Value::as_str) {
            let name = name.trim_start_matches("#/$defs/");
            return (self.defs.get(name).unwrap_or(&Value::Null), false);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = schema.get(key).and_then(Value::as_array) {
                let not_null: Vec<&Value> = options
                    .iter()
                    .filter(|o| o.get("type").and_then(Value::as_str) != Some("null"))
                    .collect();
                if not_null.len() == 1 && options.len() == 2 {
                    return (self.resolve(not_null[0]).0, true);
                }
            }
        }
        if let Some(types) = schema.get("type").and_then(Value::as_array)
            && types.iter().any(|t| t == "null")
        {
            return (schema, true);
        }
        (schema, false)
    }

    /// The type as the reference names it.
    fn type_name(&self, schema: &Value) -> String {
        let (schema, optional) = self.resolve(schema);
        let name = if let Some(values) = schema.get("enum").and_then(Value::as_array) {
            values
                .iter()
                .map(|v| format!("`{}`", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(" or ")
        } else if let Some(values) = schema.get("oneOf").and_then(Value::as_array) {
            values
                .iter()
                .filter_map(|v| v.get("const").and_then(Value::as_str))
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        } else if schema.get("properties").is_some() {
            "table".to_owned()
        } else {
            let kind = match schema.get("type") {
                Some(Value::String(t)) => t.clone(),
                Some(Value::Array(types)) => types
                    .iter()
                    .filter_map(Value::as_str)
                    .find(|t| *t != "null")
                    .unwrap_or("value")
                    .to_owned(),
                _ => "value".to_owned(),
            };
            match kind.as_str() {
                "array" => format!(
                    "list of {}",
                    plural(&self.type_name(schema.get("items").unwrap_or(&Value::Null)))
                ),
                "object" => format!(
                    "table of {}",
                    plural(
                        &self.type_name(schema.get("additionalProperties").unwrap_or(&Value::Null))
                    )
                ),
                "string" if schema.get("format").and_then(Value::as_str) == Some("duration") => {
                    "duration".to_owned()
                }
                "integer" if schema.get("minimum").and_then(Value::as_f64) == Some(0.0) => {
                    "integer ≥ 0".to_owned()
                }
                other => other.to_owned(),
            }
        };
        match optional {
            true => format!("{name}, optional"),
            false => name,
        }
    }

    /// The rows of `schema`'s properties under `path`; tables nest with dotted keys, the
    /// fields of a list's tables follow it as `list[].field`.
    fn rows(
        &self,
        schema: &Value,
        path: &[String],
        defaults: Option<&Value>,
        in_env: bool,
        out: &mut String,
        long_defaults: &mut Vec<(String, Value)>,
    ) {
        let (schema, _) = self.resolve(schema);
        let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
            return;
        };
        for (name, field) in properties {
            let mut key_path = path.to_vec();
            key_path.push(name.clone());
            let key = key_path.join(".");
            let default = defaults.and_then(|d| d.get(name));
            let (resolved, _) = self.resolve(field);
            let about = description(field)
                .or_else(|| description(resolved))
                .unwrap_or_default();
            let env = match in_env {
                true => format!("`{}`", self.env_name(&key_path)),
                false => "file only".to_owned(),
            };
            if resolved.get("properties").is_some() {
                self.rows(resolved, &key_path, default, in_env, out, long_defaults);
                continue;
            }
            let default_cell = match default {
                None => String::new(),
                Some(Value::Null) => "unset".to_owned(),
                Some(value) => {
                    let text = value.to_string();
                    if text.len() <= INLINE_DEFAULT {
                        format!("`{}`", text.replace('|', "\\|"))
                    } else {
                        long_defaults.push((self.full_key(&key), value.clone()));
                        "below".to_owned()
                    }
                }
            };
            let _ = writeln!(
                out,
                "| `{key}` | {} | {default_cell} | {env} | {} |",
                self.type_name(field),
                about.replace('\n', " ").replace('|', "\\|")
            );
            // The fields of a list's or a table's entries.
            let items = resolved
                .get("items")
                .or_else(|| resolved.get("additionalProperties"));
            if let Some(items) = items {
                let (entry, _) = self.resolve(items);
                if entry.get("properties").is_some() {
                    let marker = match resolved.get("items") {
                        Some(_) => format!("{name}[]"),
                        None => format!("{name}.<name>"),
                    };
                    let mut entry_path = path.to_vec();
                    entry_path.push(marker);
                    self.rows(entry, &entry_path, None, false, out, long_defaults);
                }
            }
        }
    }

    fn full_key(&self, key: &str) -> String {
        match self.table {
            Some(table) => format!("{table}.{key}"),
            None => key.to_owned(),
        }
    }

    fn env_name(&self, path: &[String]) -> String {
        let parts: Vec<String> = self
            .table
            .into_iter()
            .map(str::to_owned)
            .chain(path.iter().cloned())
            .map(|p| p.to_ascii_uppercase())
            .collect();
        format!("KILN_{}", parts.join("__"))
    }
}

fn description(schema: &Value) -> Option<String> {
    schema
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn plural(name: &str) -> String {
    match name {
        "table" => "tables".to_owned(),
        "string" => "strings".to_owned(),
        "integer" | "integer ≥ 0" => "integers".to_owned(),
        other => other.to_owned(),
    }
}

/// A default too long for its cell as TOML: a list of flat tables, or `key = value`.
fn toml_of(key: &str, value: &Value) -> String {
    let scalar = |v: &Value| match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    let mut out = String::new();
    match value {
        Value::Array(items) if items.iter().all(Value::is_object) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                let _ = writeln!(out, "[[{key}]]");
                for (k, v) in item.as_object().unwrap_or(&Map::new()) {
                    let _ = writeln!(out, "{k} = {}", scalar(v));
                }
            }
        }
        Value::Object(map) => {
            let _ = writeln!(out, "[{key}]");
            for (k, v) in map {
                let _ = writeln!(out, "{k} = {}", scalar(v));
            }
        }
        other => {
            let _ = writeln!(out, "{key} = {other}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn reference_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md")
    }

    #[test]
    fn the_configuration_reference_is_current() {
        let generated = super::markdown();
        let path = reference_file();
        if std::env::var_os("KILN_WRITE_DOCS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            written == generated,
            "docs/config.md is out of date: KILN_WRITE_DOCS=1 cargo test -p kiln-server reference"
        );
    }

    #[test]
    fn every_key_is_documented_with_its_environment_name() {
        let reference = super::markdown();
        for row in [
            "| `listen` | string | `\"127.0.0.1:7400\"` | `KILN_LISTEN` |",
            "| `shutdown_grace` | duration | `\"30s\"` | `KILN_SHUTDOWN_GRACE` |",
            "| `batching.max_batch_size` | integer ≥ 0 | `32` | `KILN_INFERENCE__BATCHING__MAX_BATCH_SIZE` |",
            "| `models[].path` | string |  | file only |",
            "| `log_format` | `text` or `json` | `\"text\"` | `KILN_LOG_FORMAT` |",
        ] {
            assert!(reference.contains(row), "{row} in:\n{reference}");
        }
        assert!(reference.contains("[[billing.token_prices]]\ncached_input = \"0.05\""));
        assert!(reference.contains("max_parameters = 4000000000\n"));
        // Every key of every section, as serde names it, has its row.
        let keys = |value: serde_json::Value| -> Vec<String> {
            value.as_object().unwrap().keys().cloned().collect()
        };
        let config = crate::config::KilnConfig::default();
        let sections = [
            serde_json::to_value(&config.server).unwrap(),
            serde_json::to_value(&config.identity).unwrap(),
            serde_json::to_value(&config.registry).unwrap(),
            serde_json::to_value(&config.scheduler).unwrap(),
            serde_json::to_value(&config.billing).unwrap(),
            serde_json::to_value(&config.inference).unwrap(),
            serde_json::to_value(&config.gateway).unwrap(),
        ];
        for key in sections.into_iter().flat_map(keys) {
            assert!(
                reference.contains(&format!("| `{key}")),
                "{key} is documented"
            );
        }
    }
}
