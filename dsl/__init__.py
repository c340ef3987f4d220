"""Front end of attnc: grammar, AST with source spans, parser, checker, diagnostics, printer."""
