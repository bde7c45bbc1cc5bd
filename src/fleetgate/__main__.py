from fleetgate.cli.main import main

main()
