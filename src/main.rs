//! The `croupier` binary: read configuration, start logging, run a subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use croupier::config::Config;
use croupier::startup::{Application, open_store, shutdown_signal};
use croupier::telemetry;

#[derive(Parser)]
#[command(
    name = "croupier",
    version,
    about = "Realtime backend for shared roulette rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP and WebSocket traffic (the default).
    Serve,
    /// Apply pending database migrations (the expand steps; see --contract).
    Migrate {
        /// Also apply the contract steps, which remove what only the previous
        /// release uses. Only once no instance of the previous release runs.
        #[arg(long)]
        contract: bool,
    },
    /// Revert the newest N applied migrations.
    Rollback { steps: usize },
    /// List migrations and whether each is applied.
    MigrationStatus,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // A missing .env is normal; a malformed one is worth saying.
    if let Err(err) = dotenvy::dotenv()
        && !err.not_found()
    {
        eprintln!("croupier: ignoring .env: {err}");
    }
    telemetry::init_tracing();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("croupier: {err}");
            return ExitCode::from(2);
        }
    };
    match run(cli.command.unwrap_or(Command::Serve), config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("croupier: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            Application::build(config)
                .await?
                .run_until(shutdown_signal())
                .await
        }
        Command::Migrate { contract } => {
            let store = open_store(&config).await?;
            if contract {
                store.migrate_contract().await?;
                println!("migrations applied, contract steps included");
            } else {
                store.migrate().await?;
                println!("migrations applied");
            }
            Ok(())
        }
        Command::Rollback { steps } => {
            let store = open_store(&config).await?;
            store.rollback(steps).await?;
            println!("rolled back {steps} migration(s)");
            Ok(())
        }
        Command::MigrationStatus => {
            let store = open_store(&config).await?;
            for m in store.migration_status().await? {
                let state = if m.applied { "applied" } else { "pending" };
                println!("{:>16}  {:<8} {}", m.version, state, m.description);
            }
            Ok(())
        }
    }
}
