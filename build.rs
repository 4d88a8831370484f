// `sqlx::migrate!` embeds the files under migrations/ at compile time, but
// cargo does not know that: without this, adding a migration file alone would
// not rebuild the binary that should carry it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
