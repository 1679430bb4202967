"""What runs inside a ModelWorker actor: units of work, clean and cell evaluation, attack units."""
