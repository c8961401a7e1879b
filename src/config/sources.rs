//! Where settings come from besides flags and the environment: the TOML file, whose
//! values become the flags' defaults, and the errors that name a setting every way it
//! can be given.
use std::{collections::BTreeMap, fmt, path::PathBuf};

use super::{ConfigError, SettingsArgs};

/// Where a setting can be given, for error messages: read off the clap definition,
/// so every flag is a file key too and no second list can fall behind.
pub(super) struct Key {
    name: String,
    env: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (--{}, `{}` in the config file)",
            self.env,
            self.name.replace('_', "-"),
            self.name
        )
    }
}

/// Every setting's file key (the flag's name with `_`), except `config` itself.
pub(super) fn keys() -> Vec<Key> {
    let command = <SettingsArgs as clap::Args>::augment_args(clap::Command::new("settings"));
    command
        .get_arguments()
        .filter(|a| a.get_id() != "config")
        .map(|a| Key {
            name: a.get_id().to_string(),
            env: a
                .get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
        .collect()
}

pub(super) fn key(name: &str) -> Key {
    keys()
        .into_iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| Key {
            name: name.to_owned(),
            env: String::new(),
        })
}

/// `T` as its flags' defaults make it: no command line, no environment, no file.
pub fn defaults_of<T: clap::Args + clap::FromArgMatches>() -> T {
    let command =
        T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None::<&str>));
    command
        .try_get_matches_from(["defaults"])
        .and_then(|m| T::from_arg_matches(&m))
        .unwrap_or_else(|e| unreachable!("the defaults parse: {e}"))
}

/// `command` (one taking [`SettingsArgs`]) with the file's values as its defaults:
/// flags and environment variables still win, and clap parses the file's values as
/// it parses theirs.
pub fn with_file_defaults(
    command: clap::Command,
    file: &BTreeMap<String, String>,
) -> clap::Command {
    file.iter().fold(command, |command, (name, value)| {
        command.mut_arg(name, |arg| arg.default_value(value.clone()))
    })
}

/// Why a command line could not be parsed.
#[derive(Debug)]
pub enum ParseError {
    /// Help, version, unknown flags: clap prints these itself.
    Clap(clap::Error),
    /// A bad setting or config file.
    Config(ConfigError),
}

/// Parses `argv` with `command`. When the command (or the subcommand given) takes
/// [`SettingsArgs`] and names a config file, the file's values become the defaults
/// and the line is parsed again, so flags and environment still win.
pub fn parse_with_file(
    command: clap::Command,
    argv: Vec<std::ffi::OsString>,
) -> Result<clap::ArgMatches, ParseError> {
    let first = command
        .clone()
        .try_get_matches_from(argv.clone())
        .map_err(clap_error)?;
    let (sub, matches) = match first.subcommand() {
        Some((name, m)) => (Some(name.to_owned()), m),
        None => (None, &first),
    };
    // Commands without settings (`worker`, `jobs`) have no `config`.
    let Some(path) = matches.try_get_one::<PathBuf>("config").ok().flatten() else {
        return Ok(first);
    };
    let file = read_file(path).map_err(ParseError::Config)?;
    let command = match sub {
        Some(name) => command.mut_subcommand(name, |c| with_file_defaults(c, &file)),
        None => with_file_defaults(command, &file),
    };
    command.try_get_matches_from(argv).map_err(clap_error)
}

fn clap_error(error: clap::Error) -> ParseError {
    explain(&error).map_or(ParseError::Clap(error), ParseError::Config)
}

/// A clap error about a setting's value, reworded to name the setting every way it
/// can be given (flag, variable, file key); URLs and secrets are never echoed.
/// `None` for other errors (unknown flags, help), which clap reports itself.
pub fn explain(error: &clap::Error) -> Option<ConfigError> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::ValueValidation {
        return None;
    }
    let ContextValue::String(arg) = error.get(ContextKind::InvalidArg)? else {
        return None;
    };
    let ContextValue::String(value) = error.get(ContextKind::InvalidValue)? else {
        return None;
    };
    // `--addr <ADDR>` names the setting `addr`.
    let flag = arg.trim_start_matches('-').split(' ').next()?;
    let name = flag.replace('-', "_");
    let why = std::error::Error::source(error)
        .map(ToString::to_string)
        .unwrap_or_default();
    let shown = if name.contains("url") || name.contains("secret") || name.contains("key") {
        "<hidden>".to_owned()
    } else {
        format!("{value:?}")
    };
    Some(ConfigError(format!(
        "invalid {}: {shown}: {why}",
        key(&name)
    )))
}

/// Reads the TOML file into key -> string, rejecting keys we do not know.
pub fn read_file(path: &std::path::Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    let table: toml::Table = text.parse().map_err(|e| {
        ConfigError(format!(
            "config file {} is not valid TOML: {e}",
            path.display()
        ))
    })?;
    let keys = keys();
    let mut out = BTreeMap::new();
    for (name, value) in table {
        if !keys.iter().any(|k| k.name == name) {
            let known: Vec<_> = keys.iter().map(|k| k.name.as_str()).collect();
            return Err(ConfigError(format!(
                "unknown key `{name}` in {}; known keys: {}",
                path.display(),
                known.join(", ")
            )));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        out.insert(name, text);
    }
    Ok(out)
}
