"""`make demo`: the whole loraplex chain on one machine with no GPU and no cluster."""
