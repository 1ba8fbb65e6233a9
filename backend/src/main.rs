//! The `blkgraph` program.

use blkgraph_backend::cli::{self, Command};
use blkgraph_backend::control::OBJECT_TYPES;
use blkgraph_backend::iothreads::IOTHREAD_PROPERTIES;

fn main() {
    let level = std::env::var("BLKGRAPH_LOG").unwrap_or_else(|_| "info".into());
    env_logger::Builder::new()
        .parse_filters(&level)
        .format_timestamp_micros()
        .init();
    // Errors as qemu-storage-daemon reports them: the program name, the
    // option and its argument, the error; exit status 1.
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
        Ok(Command::ObjectHelp(None)) => {
            println!("List of user creatable objects:");
            for t in OBJECT_TYPES {
                println!("  {t}");
            }
            0
        }
        Ok(Command::ObjectHelp(Some(kind))) => match kind.as_str() {
            "iothread" | "throttle-group" => {
                println!("{kind} options:");
                let props: &[&str] = if kind == "iothread" {
                    IOTHREAD_PROPERTIES
                } else {
                    &["limits=<ThrottleLimits>"]
                };
                for p in props {
                    println!("  {p}");
                }
                0
            }
            other => {
                eprintln!("blkgraph: invalid object type: {other}");
                1
            }
        },
        Ok(Command::Run(config)) => match blkgraph_backend::daemon::run(config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("blkgraph: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("blkgraph: {e}");
            1
        }
    };
    std::process::exit(code);
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
