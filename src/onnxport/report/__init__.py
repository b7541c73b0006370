"""What people read: console tables of a bundle's verification (and, later, markdown / html
reports with plots). Reads the typed manifest; never computes anything itself."""
