"""What runs the stack: Prometheus/Grafana config generators and deployment files."""
