use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // candle asks for its thread count on every matrix product and, unless RAYON_NUM_THREADS
    // is set, works it out by reading /proc/cpuinfo: a quarter of the node's time on small
    // models. Setting it once to what rayon would use anyway keeps the answer and drops the
    // reads. SAFETY: no other thread exists yet (the runtime is built below).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = agora_node::cli::Cli::parse();
    match runtime.block_on(cli.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
