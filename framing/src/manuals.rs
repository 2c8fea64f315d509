//! Shell completions and man pages of the devstreams programs, generated
//! from each program's own clap definition, so they can never disagree with
//! `--help`. Packagers run them at build time (`relay completions bash`,
//! `relay man DIR`, `device-proxy --man DIR`, …) and install the results;
//! nothing here reads the network or the environment.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes the completion script of `command` for `shell`.
pub fn write_completions(
    mut command: clap::Command,
    shell: Shell,
    output: &mut dyn Write,
) -> io::Result<()> {
    let name = command.get_name().to_string();
    // clap_complete panics on a failed write; render into memory first so
    // a closed pipe stays an error the caller reports.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    output.write_all(&script)?;
    output.flush()
}

/// Writes the man page (section 1) of `command` itself, without its
/// subcommands' pages.
pub fn write_man_page(command: clap::Command, output: &mut dyn Write) -> io::Result<()> {
    clap_mangen::Man::new(command).render(output)?;
    output.flush()
}

/// Writes `NAME.1` for `command` and `NAME-SUB.1` (and deeper) for each of
/// its visible subcommands into `directory`, creating it; returns the files
/// written, the top page first.
pub fn write_man_pages(command: clap::Command, directory: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(directory)?;
    let mut command = command.disable_help_subcommand(true);
    // Builds the full names (`relay-device-add`) that the pages are named by.
    command.build();
    let mut written = Vec::new();
    write_page_and_subpages(command, directory, &mut written)?;
    Ok(written)
}

/// What `relay man [DIR]` and `--man DIR` do: with a directory, write every
/// page there and name each file on stdout; without, the top page on stdout
/// (`relay man | man -l -`).
pub fn print_man_pages(command: clap::Command, directory: Option<&Path>) -> io::Result<()> {
    let mut output = io::stdout().lock();
    match directory {
        Some(directory) => {
            for path in write_man_pages(command, directory)? {
                writeln!(output, "{}", path.display())?;
            }
            output.flush()
        }
        None => write_man_page(command, &mut output),
    }
}

fn write_page_and_subpages(
    command: clap::Command,
    directory: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let subcommands: Vec<clap::Command> = command
        .get_subcommands()
        .filter(|subcommand| !subcommand.is_hide_set())
        .cloned()
        .collect();
    written.push(clap_mangen::Man::new(command).generate_to(directory)?);
    for subcommand in subcommands {
        write_page_and_subpages(subcommand, directory, written)?;
    }
    Ok(())
}

/// Answers the hidden `--completions SHELL` and `--man DIRECTORY` flags of
/// the programs whose positional arguments leave no room for subcommands:
/// `None` when neither was given, else what writing them gave (an error
/// says what could not be written).
pub fn answer_manual_flags(
    command: clap::Command,
    completions: Option<Shell>,
    man: Option<&Path>,
) -> Option<Result<(), String>> {
    if let Some(shell) = completions {
        return Some(
            write_completions(command, shell, &mut io::stdout())
                .map_err(|error| format!("cannot write the completion script to stdout: {error}")),
        );
    }
    let directory = man?;
    Some(print_man_pages(command, Some(directory)).map_err(|error| {
        format!(
            "cannot write the man page into {}: {error}",
            directory.display()
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> clap::Command {
        clap::Command::new("example")
            .about("an example program")
            .arg(clap::Arg::new("data-dir").long("data-dir"))
            .subcommand(
                clap::Command::new("device")
                    .about("devices")
                    .subcommand(clap::Command::new("add").about("add one")),
            )
    }

    #[test]
    fn every_visible_subcommand_gets_its_own_page() {
        let directory = tempfile::tempdir().expect("temp dir");
        let written = write_man_pages(example(), directory.path()).expect("pages written");
        let names: Vec<String> = written
            .iter()
            .filter_map(|path| path.file_name())
            .map(|name| name.to_string_lossy().to_string())
            .collect();
        assert_eq!(
            names,
            ["example.1", "example-device.1", "example-device-add.1"]
        );
        let page = std::fs::read_to_string(&written[0]).expect("page readable");
        assert!(page.contains(".TH example 1"), "{page}");
        assert!(page.contains("data\\-dir"), "{page}");
    }

    #[test]
    fn completions_name_the_subcommands() {
        let mut script = Vec::new();
        write_completions(example(), Shell::Bash, &mut script).expect("written");
        let script = String::from_utf8(script).expect("utf-8");
        assert!(script.contains("device"), "{script}");
        assert!(script.contains("--data-dir"), "{script}");
    }
}
