use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = mediaplane::cli::Cli::parse();
    match mediaplane::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
