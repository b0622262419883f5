"""Tensor parallelism: starting ranks (launch), who a rank is (context), the degrees a model
allows (degrees), the column- and row-parallel layers (layers), and every collective (comm), with
the ways prefill hides its sums behind compute (overlap, waves, copy_engine)."""
