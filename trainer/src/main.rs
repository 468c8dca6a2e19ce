//! `modtrain`: generate the built-in dataset, train and evaluate modulated
//! multi-task retrieval networks. See `modtrain --help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

// candle allocates and frees large buffers on every op; glibc returns them to the
// kernel each time (mmap/munmap and page faults, measured as much system as user
// time). mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match args.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`modtrain eval … | head`) is not a failure.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("modtrain: {err:#}");
            ExitCode::from(2)
        }
    }
}
