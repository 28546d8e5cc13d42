//! Pass/fail bookkeeping printed the way `cargo test` prints it.

use std::time::Duration;

#[derive(Default)]
pub struct Tally {
    pub passed: usize,
    pub ignored: usize,
    /// Test name and the one-line reason.
    pub failures: Vec<(String, String)>,
    pub wall: Duration,
    /// Time from starting qemu to the guest's /init running.
    pub boot: Option<Duration>,
    /// The guest kernel's `uname -r`, as it reported it.
    pub release: Option<String>,
}

impl Tally {
    pub fn pass(&mut self, name: &str) {
        self.passed += 1;
        println!("test {name} ... ok");
    }

    pub fn ignore(&mut self, name: &str) {
        self.ignored += 1;
        println!("test {name} ... ignored");
    }

    pub fn fail(&mut self, name: &str, reason: &str) {
        println!("test {name} ... FAILED");
        self.failures.push((name.to_string(), reason.to_string()));
    }

    pub fn add(&mut self, other: &Tally) {
        self.passed += other.passed;
        self.ignored += other.ignored;
        self.failures.extend(other.failures.iter().cloned());
    }

    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn print_result(&self) {
        if !self.failures.is_empty() {
            println!("\nfailures:");
            for (name, reason) in &self.failures {
                println!("    {name}: {reason}");
            }
            println!();
        }
        println!(
            "test result: {}. {} passed; {} failed; {} ignored; 0 measured; 0 filtered out; finished in {:.2}s",
            if self.ok() { "ok" } else { "FAILED" },
            self.passed,
            self.failures.len(),
            self.ignored,
            self.wall.as_secs_f64()
        );
    }
}
