//! `--config FILE`: TOML settings for every devstreams program, with one
//! key per command-line argument, so a deployment can keep its settings in
//! a file instead of a long command line.
//!
//! The file is not a second description of the settings: its keys are the
//! arguments' long names with `_` for `-` (and the names of positional
//! arguments), found by walking the program's clap `Command`. Each value is
//! checked here, with the argument's own value parser, so a mistake is
//! reported with the file, line and key; then it becomes the argument's
//! default. Clap keeps the rest of the precedence: a flag beats its
//! environment variable, which beats the file, which beats the built-in
//! default.
//!
//! Every program also gets `--log-format text|json` here, so the four
//! programs spell it, and read it from their files, the same way.

use std::any::TypeId;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::builder::{ArgAction, Command};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, CommandFactory, FromArgMatches};
use toml::Spanned;

use crate::process::LogFormat;

/// The id (and long name) of the flag naming the file.
pub const CONFIG_ARGUMENT: &str = "config";
/// The id (and long name) of the shared log format flag.
pub const LOG_FORMAT_ARGUMENT: &str = "log_format";

/// What `--config` says about itself in `--help`.
const CONFIG_HELP: &str = "TOML file of settings: one key per flag, its long name with _ for - \
(e.g. max_streams = 100), arrays for repeatable flags. Precedence: flag > environment > file > default";

/// A configuration file that cannot be used: what is wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A key the program does not know, a value of the wrong TOML type, or
    /// one the argument refuses.
    #[error("{path}:{line}: key `{key}`: {message}")]
    Key {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// Which positional arguments take a value from the file. A positional of
/// a subcommand like `relay device remove DEVICE_ID` must never get a
/// silent default; the proxies' CONNECTION_STRING and DEVICE_ID should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positionals {
    /// Every named positional argument, in every subcommand.
    Included,
    /// None: only flags are keys.
    Excluded,
}

/// How one program reads its configuration.
#[derive(Debug, Clone)]
pub struct ProgramConfig {
    /// The file used when `--config` is not given, if it exists.
    pub default_path: Option<PathBuf>,
    pub positionals: Positionals,
}

/// What a program gets from its command line and configuration file.
#[derive(Debug)]
pub struct Parsed<T> {
    pub arguments: T,
    pub matches: ArgMatches,
    pub log_format: LogFormat,
    /// The file that was read, if any.
    pub config_path: Option<PathBuf>,
}

/// One key of the file with the line it is on.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    line: usize,
    value: toml::Value,
}

/// Adds `--config` and `--log-format` to a program's command (global, so
/// that every subcommand takes them).
pub fn with_common_arguments(command: Command) -> Command {
    command
        .arg(
            Arg::new(CONFIG_ARGUMENT)
                .long("config")
                .value_name("FILE")
                .global(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help(CONFIG_HELP),
        )
        .arg(
            Arg::new(LOG_FORMAT_ARGUMENT)
                .long("log-format")
                .value_name("FORMAT")
                .global(true)
                .env("DEVSTREAMS_LOG_FORMAT")
                .default_value("text")
                .value_parser(clap::builder::EnumValueParser::<LogFormat>::new())
                .help(
                    "Log lines on stderr: text, or json (one JSON object per line, fields as keys)",
                ),
        )
}

/// Parses the process's command line with its configuration file; prints
/// the error and exits (2 for usage, 1 for a bad file) when either is wrong.
pub fn parse<T: CommandFactory + FromArgMatches>(program: &ProgramConfig) -> Parsed<T> {
    match try_parse_from::<T>(program, std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(ParseError::Usage(error)) => error.exit(),
        Err(ParseError::Config(error)) => {
            let name = T::command().get_name().to_string();
            eprintln!("{name}: error: {error}");
            std::process::exit(1)
        }
    }
}

/// Why the command line and file gave no settings.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Usage(#[from] clap::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// [`parse`] for a given command line (the first item is the program).
pub fn try_parse_from<T: CommandFactory + FromArgMatches>(
    program: &ProgramConfig,
    arguments: impl IntoIterator<Item = impl Into<OsString>>,
) -> Result<Parsed<T>, ParseError> {
    let arguments: Vec<OsString> = arguments.into_iter().map(Into::into).collect();
    let mut command = with_common_arguments(T::command());
    let config_path = config_path_in(&arguments)
        .or_else(|| program.default_path.clone().filter(|path| path.is_file()));
    if let Some(path) = &config_path {
        command = apply(command, path, program.positionals)?;
    }
    let matches = command.try_get_matches_from(arguments)?;
    let arguments = T::from_arg_matches(&matches)?;
    let log_format = matches
        .get_one::<LogFormat>(LOG_FORMAT_ARGUMENT)
        .copied()
        .unwrap_or_default();
    Ok(Parsed {
        arguments,
        matches,
        log_format,
        config_path,
    })
}

/// The value of `--config FILE` or `--config=FILE`, read before clap parses
/// because the file decides the defaults clap parses with.
fn config_path_in(arguments: &[OsString]) -> Option<PathBuf> {
    let mut rest = arguments.iter().skip(1);
    while let Some(argument) = rest.next() {
        let text = argument.to_string_lossy();
        if text == "--" {
            return None;
        }
        if text == "--config" {
            return rest.next().map(PathBuf::from);
        }
        if let Some(value) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(value));
        }
    }
    None
}

/// Reads `path` and makes its values the defaults of `command`'s arguments.
pub fn apply(
    command: Command,
    path: &Path,
    positionals: Positionals,
) -> Result<Command, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Unreadable {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    let entries = parse_entries(path, &text)?;
    let mut inspected = command.clone();
    inspected.build();
    let mut command = command;
    let mut given: Vec<(Vec<String>, &Arg, &Entry)> = Vec::new();
    for entry in &entries {
        let targets = arguments_for_key(&inspected, &entry.key, positionals);
        if targets.is_empty() {
            return Err(key_error(
                path,
                entry,
                "unknown key (keys are the long names of the flags, with _ for -; see --help)",
            ));
        }
        for (subcommand_path, argument) in targets {
            let values =
                values_for(argument, entry).map_err(|message| key_error(path, entry, &message))?;
            for value in &values {
                check_value(argument, value).map_err(|message| key_error(path, entry, &message))?;
            }
            if gives_a_value(&entry.value) {
                given.push((subcommand_path.clone(), argument, entry));
            }
            let hide = argument.is_hide_env_values_set();
            let id = argument.get_id().to_string();
            command = mut_argument(command, &subcommand_path, &id, |argument| {
                argument
                    .default_values(values.clone())
                    .hide_default_value(hide)
            });
        }
    }
    check_conflicts(&inspected, &given, path)?;
    Ok(command)
}

/// Whether a file value sets its argument: `false` for a switch and an empty
/// array leave it as if the key were absent.
fn gives_a_value(value: &toml::Value) -> bool {
    match value {
        toml::Value::Boolean(set) => *set,
        toml::Value::Array(values) => !values.is_empty(),
        _ => true,
    }
}

/// Refuses two keys of the file whose arguments conflict (`no_mqtt` with
/// `mqtt_listen`). Values from the file become defaults, and clap checks
/// conflicts only among arguments given on the command line or in the
/// environment, so without this one of the two would be silently ignored.
/// A flag on the command line still beats a file key it conflicts with.
fn check_conflicts(
    inspected: &Command,
    given: &[(Vec<String>, &Arg, &Entry)],
    path: &Path,
) -> Result<(), ConfigError> {
    for (subcommand_path, argument, entry) in given {
        let Some(command) = subcommand_at(inspected, subcommand_path) else {
            continue;
        };
        let conflicting = command.get_arg_conflicts_with(argument);
        let other = given.iter().find(|(other_path, other, _)| {
            other_path == subcommand_path
                && conflicting
                    .iter()
                    .any(|conflict| conflict.get_id() == other.get_id())
        });
        if let Some((_, _, other)) = other {
            let (first, second) = if other.line < entry.line {
                (other, entry)
            } else {
                (entry, other)
            };
            let message = format!(
                "cannot be used with `{}` (line {}); keep one of them",
                first.key, first.line
            );
            return Err(key_error(path, second, &message));
        }
    }
    Ok(())
}

/// The subcommand at `subcommand_path` (the command itself when empty).
fn subcommand_at<'c>(command: &'c Command, subcommand_path: &[String]) -> Option<&'c Command> {
    match subcommand_path.split_first() {
        None => Some(command),
        Some((first, rest)) => subcommand_at(command.find_subcommand(first)?, rest),
    }
}

/// Reads the file's top-level keys, each with its line.
fn parse_entries(path: &Path, text: &str) -> Result<Vec<Entry>, ConfigError> {
    type Table = std::collections::BTreeMap<Spanned<String>, Spanned<toml::Value>>;
    let table: Table = toml::from_str(text).map_err(|error| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: error
            .span()
            .map(|span| line_of(text, span.start))
            .unwrap_or(1),
        message: error.message().trim().to_string(),
    })?;
    let mut entries: Vec<Entry> = table
        .into_iter()
        .map(|(key, value)| Entry {
            line: line_of(text, key.span().start),
            key: key.into_inner().replace('-', "_"),
            value: value.into_inner(),
        })
        .collect();
    entries.sort_by_key(|entry| entry.line);
    for (index, entry) in entries.iter().enumerate() {
        if let Some(earlier) = entries[..index].iter().find(|other| other.key == entry.key) {
            let message = format!(
                "given twice (also on line {}, spelled with - or _)",
                earlier.line
            );
            return Err(key_error(path, entry, &message));
        }
    }
    Ok(entries)
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .unwrap_or(text)
        .bytes()
        .filter(|&byte| byte == b'\n')
        .count()
        + 1
}

fn key_error(path: &Path, entry: &Entry, message: &str) -> ConfigError {
    ConfigError::Key {
        path: path.to_path_buf(),
        line: entry.line,
        key: entry.key.clone(),
        message: message.to_string(),
    }
}

/// Whether an argument can be set from a file at all.
fn configurable(argument: &Arg) -> bool {
    let id = argument.get_id().as_str();
    !matches!(id, "help" | "version" | CONFIG_ARGUMENT)
        && !matches!(
            argument.get_action(),
            ArgAction::Help | ArgAction::HelpLong | ArgAction::HelpShort | ArgAction::Version
        )
}

/// The key an argument answers to: its long name with `_` for `-`, or the
/// id of a positional argument.
fn key_of(argument: &Arg) -> Option<String> {
    if argument.is_positional() {
        return Some(argument.get_id().to_string());
    }
    argument.get_long().map(|long| long.replace('-', "_"))
}

/// Every argument (with the path of subcommands leading to it) named by
/// `key`; a global argument is found once, where it is defined.
fn arguments_for_key<'c>(
    command: &'c Command,
    key: &str,
    positionals: Positionals,
) -> Vec<(Vec<String>, &'c Arg)> {
    let mut found = Vec::new();
    collect(command, key, positionals, &mut Vec::new(), &mut found);
    found
}

fn collect<'c>(
    command: &'c Command,
    key: &str,
    positionals: Positionals,
    path: &mut Vec<String>,
    found: &mut Vec<(Vec<String>, &'c Arg)>,
) {
    for argument in command.get_arguments() {
        let propagated_global = argument.is_global_set() && !path.is_empty();
        let positional_allowed = !argument.is_positional() || positionals == Positionals::Included;
        if configurable(argument)
            && !propagated_global
            && positional_allowed
            && key_of(argument).as_deref() == Some(key)
        {
            found.push((path.clone(), argument));
        }
    }
    for subcommand in command.get_subcommands() {
        path.push(subcommand.get_name().to_string());
        collect(subcommand, key, positionals, path, found);
        path.pop();
    }
}

fn mut_argument(
    command: Command,
    subcommand_path: &[String],
    id: &str,
    change: impl FnOnce(Arg) -> Arg,
) -> Command {
    match subcommand_path.split_first() {
        None => command.mut_arg(id, change),
        Some((first, rest)) => command.mut_subcommand(first, |subcommand| {
            mut_argument(subcommand, rest, id, change)
        }),
    }
}

/// Whether the argument is a switch (`--no-tls`): a TOML boolean.
fn is_switch(argument: &Arg) -> bool {
    matches!(
        argument.get_action(),
        ArgAction::SetTrue | ArgAction::SetFalse
    )
}

/// Whether the argument takes several values: a TOML array.
fn is_repeatable(argument: &Arg) -> bool {
    matches!(argument.get_action(), ArgAction::Append)
        || argument
            .get_num_args()
            .is_some_and(|range| range.max_values() > 1)
}

/// Whether the argument's value is a number: a TOML integer or float.
fn is_number(argument: &Arg) -> bool {
    let type_id = argument.get_value_parser().type_id();
    [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i8>(),
        TypeId::of::<i16>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<isize>(),
        TypeId::of::<f32>(),
        TypeId::of::<f64>(),
    ]
    .iter()
    .any(|number| type_id == *number)
}

/// The argument's values written as on the command line, or why the TOML
/// value has the wrong type for it.
fn values_for(argument: &Arg, entry: &Entry) -> Result<Vec<String>, String> {
    if is_switch(argument) {
        return match entry.value {
            toml::Value::Boolean(value) => Ok(vec![value.to_string()]),
            ref other => Err(format!(
                "expected true or false, found {}",
                type_name(other)
            )),
        };
    }
    let items: Vec<&toml::Value> = match &entry.value {
        toml::Value::Array(items) if is_repeatable(argument) => items.iter().collect(),
        toml::Value::Array(_) => {
            return Err("expected one value, found an array (this flag is not repeatable)".into())
        }
        single => vec![single],
    };
    let number = is_number(argument);
    items
        .into_iter()
        .map(|item| match item {
            toml::Value::Integer(value) if number => Ok(value.to_string()),
            toml::Value::Float(value) if number => Ok(value.to_string()),
            toml::Value::String(value) if !number => Ok(value.clone()),
            other => Err(format!(
                "expected {}, found {}",
                if number { "a number" } else { "a string" },
                type_name(other)
            )),
        })
        .collect()
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Runs the argument's own value parser on one value, as clap would for
/// the same text on the command line.
fn check_value(argument: &Arg, value: &str) -> Result<(), String> {
    let probe = Command::new("config")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(
            Arg::new("value")
                .value_parser(argument.get_value_parser().clone())
                .action(ArgAction::Set)
                .allow_hyphen_values(true)
                .required(true),
        );
    match probe.try_get_matches_from([OsStr::new(value)]) {
        Ok(_) => Ok(()),
        Err(error) => {
            let cause = std::error::Error::source(&error)
                .map(ToString::to_string)
                .unwrap_or_else(|| {
                    let rendered = error.to_string();
                    rendered
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("error: ")
                        .replace("'<value>'", "it")
                        .replace(" for '<value>'", "")
                });
            if argument.is_hide_env_values_set() {
                // A secret: the file is named, its content is not repeated.
                let cause = if value.is_empty() {
                    cause
                } else {
                    cause.replace(value, "…")
                };
                return Err(format!("bad value: {cause}"));
            }
            Err(format!("bad value {value:?}: {cause}"))
        }
    }
}

/// A secret given either as a value or as a file holding it (trimmed):
/// the higher-ranked source wins (flag > environment > config file), and
/// both at the same rank is an error, since one of them would be ignored.
pub fn value_or_file(
    matches: &ArgMatches,
    value_id: &str,
    file_id: &str,
) -> Result<Option<String>, String> {
    let value = matches.get_one::<String>(value_id).cloned();
    let file = matches.get_one::<PathBuf>(file_id).cloned();
    let rank = |id: &str| match matches.value_source(id) {
        Some(ValueSource::CommandLine) => 3,
        Some(ValueSource::EnvVariable) => 2,
        Some(ValueSource::DefaultValue) => 1,
        _ => 0,
    };
    let (value_rank, file_rank) = (rank(value_id), rank(file_id));
    match (value, file) {
        (Some(_), Some(_)) if value_rank == file_rank => {
            Err(format!("both {value_id} and {file_id} are given; give one"))
        }
        (Some(value), Some(_)) if value_rank > file_rank => Ok(Some(value)),
        (_, Some(file)) => read_secret_file(&file).map(Some),
        (value, None) => Ok(value),
    }
}

/// Reads a secret from a file (a systemd credential, a mounted secret),
/// without the surrounding white space a text editor leaves.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read the secret file {}: {error}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("the secret file {} is empty", path.display()));
    }
    Ok(secret.to_string())
}

/// Adds `SharedAccessKey=KEY` from `key_file` to a connection string that
/// has none, so the string itself can sit in a config file or unit while
/// the key stays in a file only its owner reads.
pub fn with_key_from_file(connection_string: &str, key_file: &Path) -> Result<String, String> {
    let has_key = connection_string.split(';').any(|part| {
        part.split_once('=')
            .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("SharedAccessKey"))
    });
    if has_key {
        return Err("the connection string has a SharedAccessKey and shared_access_key_file is given too; give one".into());
    }
    let key = read_secret_file(key_file)?;
    Ok(format!(
        "{};SharedAccessKey={key}",
        connection_string.trim_end_matches(';')
    ))
}

/// The per-user configuration file of a program:
/// `$XDG_CONFIG_HOME/devstreams/NAME`, else `~/.config/devstreams/NAME`.
pub fn user_config_path(file_name: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|value| !value.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })?;
    Some(base.join("devstreams").join(file_name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(name = "sample")]
    struct Sample {
        #[arg(
            value_name = "CONNECTION_STRING",
            env = "SAMPLE_CONNECTION_STRING",
            hide_env_values = true
        )]
        connection_string: Option<String>,
        #[arg(long, env = "SAMPLE_MAX_STREAMS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1000))]
        max_streams: u32,
        #[arg(long)]
        no_resume: bool,
        #[arg(long)]
        allow: Vec<String>,
        #[arg(long)]
        proxy: Option<String>,
        #[arg(long, conflicts_with = "no_resume")]
        resume_timeout: Option<u32>,
    }

    fn with_file(text: &str, arguments: &[&str]) -> Result<Parsed<Sample>, ParseError> {
        let directory = tempfile_dir();
        let path = directory.join("sample.toml");
        std::fs::write(&path, text).unwrap();
        let mut command_line = vec![
            "sample".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        command_line.extend(arguments.iter().map(|argument| argument.to_string()));
        let program = ProgramConfig {
            default_path: None,
            positionals: Positionals::Included,
        };
        try_parse_from::<Sample>(&program, command_line)
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let directory = std::env::temp_dir().join(format!(
            "devstreams-config-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&directory).unwrap();
        directory
    }

    /// The file is refused with an error that contains `expected`.
    fn assert_refused(text: &str, expected: &str) {
        let error = config_error(text);
        assert!(error.contains(expected), "{error}");
    }

    fn config_error(text: &str) -> String {
        match with_file(text, &[]) {
            Err(ParseError::Config(error)) => error.to_string(),
            other => panic!("expected a config error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn file_values_become_defaults_and_flags_win() {
        let text = "max-streams = 7\nno_resume = true\nallow = [\"a:1\", \"b:2\"]\nconnection_string = \"HostName=x\"\n";
        let parsed = with_file(text, &[]).expect("parses");
        assert_eq!(parsed.arguments.max_streams, 7);
        assert!(parsed.arguments.no_resume);
        assert_eq!(parsed.arguments.allow, ["a:1", "b:2"]);
        assert_eq!(
            parsed.arguments.connection_string.as_deref(),
            Some("HostName=x")
        );
        let parsed = with_file(text, &["--max-streams", "9", "HostName=y"]).expect("parses");
        assert_eq!(parsed.arguments.max_streams, 9);
        assert_eq!(
            parsed.arguments.connection_string.as_deref(),
            Some("HostName=y")
        );
    }

    #[test]
    fn every_kind_of_mistake_names_the_line_and_key() {
        assert_refused(
            "proxy = \"none\"\nmax_stream = 5\n",
            ":2: key `max_stream`: unknown key",
        );
        assert_refused(
            "\nmax_streams = \"5\"\n",
            ":2: key `max_streams`: expected a number, found a string",
        );
        assert_refused(
            "proxy = [\"a\", \"b\"]\n",
            ":1: key `proxy`: expected one value, found an array",
        );
        assert_refused(
            "max_streams = 5000\n",
            ":1: key `max_streams`: bad value \"5000\"",
        );
        assert_refused(
            "no_resume = \"yes\"\n",
            "key `no_resume`: expected true or false",
        );
        assert_refused("proxy = \"none\"\nmax_streams = = 5\n", "sample.toml:2:");
        assert_refused(
            "max_streams = 5\nmax-streams = 6\n",
            ":2: key `max_streams`: given twice",
        );
    }

    #[test]
    fn conflicting_keys_in_the_file_are_refused() {
        assert_refused(
            "proxy = \"none\"\nresume_timeout = 5\nno_resume = true\n",
            ":3: key `no_resume`: cannot be used with `resume_timeout` (line 2)",
        );
        // Declared on either argument, found either way round.
        assert_refused(
            "no_resume = true\nresume_timeout = 5\n",
            ":2: key `resume_timeout`: cannot be used with `no_resume` (line 1)",
        );
        // A switch set to false is no conflict.
        let parsed = with_file("no_resume = false\nresume_timeout = 5\n", &[]).expect("parses");
        assert_eq!(parsed.arguments.resume_timeout, Some(5));
        // A flag on the command line beats the file key it conflicts with.
        let parsed = with_file("resume_timeout = 5\n", &["--no-resume"]).expect("parses");
        assert!(parsed.arguments.no_resume);
    }

    #[test]
    fn a_refused_secret_is_not_echoed() {
        #[derive(Debug, Parser)]
        struct Secretive {
            #[arg(long, hide_env_values = true, env = "SECRETIVE", value_parser = clap::value_parser!(u16))]
            token: Option<u16>,
        }
        let directory = tempfile_dir();
        let path = directory.join("secret.toml");
        std::fs::write(&path, "token = 99999\n").unwrap();
        let program = ProgramConfig {
            default_path: None,
            positionals: Positionals::Included,
        };
        let error = try_parse_from::<Secretive>(
            &program,
            ["secretive", "--config", path.to_str().unwrap()],
        )
        .unwrap_err();
        assert!(!error.to_string().contains("99999"), "{error}");
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let program = ProgramConfig {
            default_path: None,
            positionals: Positionals::Included,
        };
        let error = try_parse_from::<Sample>(
            &program,
            ["sample", "--config", "/nonexistent/devstreams.toml"],
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot read the config file /nonexistent/devstreams.toml"),
            "{error}"
        );
    }

    #[test]
    fn secrets_come_from_files_and_both_at_once_is_refused() {
        let directory = tempfile_dir();
        let key = directory.join("key");
        std::fs::write(&key, "  c2VjcmV0\n").unwrap();
        assert_eq!(
            with_key_from_file("HostName=h;DeviceId=d;", &key).unwrap(),
            "HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0"
        );
        assert!(with_key_from_file("HostName=h;DeviceId=d;SharedAccessKey=x", &key).is_err());
        assert!(read_secret_file(&directory.join("missing")).is_err());
    }
}
