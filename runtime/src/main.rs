use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flowgate::cli::Cli::parse();
    flowgate::cli::init_logging(cli.verbose);
    match flowgate::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", flowgate::cli::error_text(&e));
            ExitCode::from(flowgate::cli::exit_code(&e))
        }
    }
}
