"""Where n2n reads and writes: local paths and URIs, write-then-move, folders n2n owns, names, JSON
reports."""
