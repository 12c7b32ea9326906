//! tollgate-load: the load client (SPEC section 7). Its driver lands with the load-testing issue;
//! until then it says so instead of pretending to measure anything.

fn main() -> std::process::ExitCode {
    eprintln!("tollgate-load: not implemented yet (see the load-testing issue)");
    std::process::ExitCode::from(1)
}
