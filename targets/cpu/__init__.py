"""CPU code generation: Relax legalizations, the schedule rules, graphopt's TIR passes and pipeline."""
