from vipfarm.cli import main

main()
