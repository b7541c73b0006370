"""Export-compat rewrites (one file per rewrite). The registry arrives with the rewrites issue."""
