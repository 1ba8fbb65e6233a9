//! The `blkgraph` program.

use blkgraph_backend::cli::{self, Command};

fn main() {
    let level = std::env::var("BLKGRAPH_LOG").unwrap_or_else(|_| "warn".into());
    env_logger::Builder::new()
        .parse_filters(&level)
        .format_timestamp_micros()
        .init();
    let code = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            0
        }
        Ok(Command::Version) => {
            println!("blkgraph {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::PrintCapabilities) => {
            println!(r#"{{"type": "block", "features": ["read-only", "blk-file"]}}"#);
            0
        }
        Ok(Command::Run(config)) => match blkgraph_backend::daemon::run(config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("blkgraph: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("blkgraph: {e}");
            2
        }
    };
    std::process::exit(code);
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
