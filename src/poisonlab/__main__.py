from poisonlab.cli import main

main()
