"""The process n2n runs in: the connection to Ray, the CUDA check, the quiet console."""
