//! `--summary`: instructions and blocks per function, and the totals (a
//! `perf annotate`-like view of where a stepped program spent its
//! instructions).

use std::collections::HashMap;

/// Counts per function.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    instructions: u64,
    blocks: u64,
}

/// The histogram and totals of one steps engine.
#[derive(Debug, Default)]
pub struct Summary {
    by_function: HashMap<String, Counts>,
    syscalls: u64,
}

impl Summary {
    /// An instruction of `function` ran; `ends_block` if it was a taken
    /// branch (or a system call), so the next instruction starts a block.
    pub fn instruction(&mut self, function: &str, ends_block: bool) {
        let c = self.by_function.entry(function.to_string()).or_default();
        c.instructions += 1;
        if ends_block {
            c.blocks += 1;
        }
    }

    /// A block of `function` started (block stepping), `instructions`
    /// having run since the previous report.
    pub fn block(&mut self, function: &str, instructions: u64) {
        let c = self.by_function.entry(function.to_string()).or_default();
        c.blocks += 1;
        c.instructions += instructions;
    }

    /// `n` instructions of `function` ran (block stepping: a block's
    /// instructions up to a system call).
    pub fn instructions(&mut self, function: &str, n: u64) {
        self.by_function
            .entry(function.to_string())
            .or_default()
            .instructions += n;
    }

    /// A stepped system call.
    pub fn syscall(&mut self) {
        self.syscalls += 1;
    }

    /// (instructions, blocks, system calls).
    pub fn totals(&self) -> (u64, u64, u64) {
        let (i, b) = self
            .by_function
            .values()
            .fold((0, 0), |(i, b), c| (i + c.instructions, b + c.blocks));
        (i, b, self.syscalls)
    }

    /// The totals line and the table, most instructions first (blocks
    /// counted where they end with single steps, where they start with
    /// block steps).
    pub fn render(&self, by_block: bool) -> String {
        let (i, b, s) = self.totals();
        let mut out = format!("--- steps: {i} instructions, {b} blocks, {s} system calls ---\n");
        out.push_str(&format!(
            "{:>14} {:>10}  function\n",
            "instructions", "blocks"
        ));
        let mut rows: Vec<(&String, &Counts)> = self.by_function.iter().collect();
        rows.sort_by(|a, b| b.1.instructions.cmp(&a.1.instructions).then(a.0.cmp(b.0)));
        for (name, c) in rows {
            out.push_str(&format!(
                "{:>14} {:>10}  {name}\n",
                c.instructions, c.blocks
            ));
        }
        if by_block {
            out.push_str("(blocks are counted where they start)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_and_rows_sort_by_instructions() {
        let mut s = Summary::default();
        for _ in 0..3 {
            s.instruction("loop", false);
        }
        s.instruction("loop", true);
        s.instruction("_start", false);
        s.syscall();
        assert_eq!(s.totals(), (5, 1, 1));
        let text = s.render(false);
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert!(
            rows[0].ends_with("loop") && rows[1].ends_with("_start"),
            "{text}"
        );
    }
}
