"""From a trained run to its users: `dmhpc predict` (a merger catalog), `explain`, `export`."""
