"""Tests of smat_kernels: every backend against smat_kernels.reference."""
